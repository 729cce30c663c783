"""Stage 3, evaluation (Arditi et al. 2024, § evaluation): what an intervention does to a model's replies.

direction + prompts → :mod:`.generation` (greedy replies under hooks; :mod:`.vllm_backend` for large sets) →
completions → :mod:`.judges` (substring, prefix, logit, model judges) → judgements → :mod:`.metrics`
(refusal rates with intervals, KL, CE loss) → :mod:`.conditions` (baseline / ablation / addition /
orthogonalized / random controls, written as ``results.json``). Imports core and direction.
"""
