"""Tools beside the job: checkpoint conversion (convert: InternLM2 <-> Llama layout, .bin ->
.safetensors) and the per-rank memory plan (memory_plan). Their commands are jobs/convert.py and
jobs/memory_plan.py."""
