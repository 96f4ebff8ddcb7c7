export HF_HUB_OFFLINE=1 PYTHONPATH=/work/main OMP_NUM_THREADS=1
M=/root/.cache/svdq/minilm; C=/root/.cache/svdq/bench-text/calib.txt
svdq() { python -c 'import sys; from svdq.cli import main; sys.argv[0]="svdq"; main()' "$@"; }
for s in stream no-stream stream no-stream; do
  rm -rf /tmp/p16/$s
  /usr/bin/time -f "%e s %M KB" -o /tmp/p16/$s.time bash -c "$(declare -f svdq); svdq compress $M --ratio 0.285 --calib $C -o /tmp/p16/$s --json --$s > /tmp/p16/$s.json"
  python -c "import json;d=json.load(open('/tmp/p16/$s.json'));print('$s', open('/tmp/p16/$s.time').read().strip(), d['timings_s'], d['totals']['artifact_tensor_bytes'])" >> /tmp/p16/stream.txt
done
