"""Recovery after compression: fine-tuning an artifact by distillation from its source
(`finetune`), training only what its stored form allows (`tuned`), on held-out-checked text
(`data`)."""
