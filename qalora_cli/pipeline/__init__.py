"""`qalora recipe`: a whole experiment declared in one YAML file (recipes/*.yaml), run as a
pipeline of stages (quantize, finetune, merge, eval) over a sweep, each stage reused while its
inputs are unchanged, ending in results.md, results.csv and results.png."""
