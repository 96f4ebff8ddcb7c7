"""Analyses of a model that compress does not need: singular-value spectra (`spectrum`), the attention product (`attention`), their figure (`figure`)."""
