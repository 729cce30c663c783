"""Stage 4, abliteration beyond the paper (SPEC §7; docs/abliteration.md): per-layer and per-write ablation
strengths, direction variants, a structured search of the (refusal, KL) front, and the exports users ask for.

directions (:mod:`refusal_lens.direction.variants`) and weighted edits (:mod:`refusal_lens.direction.strengths`) →
:mod:`.objectives` (first-token refusal and KL, no generation) → :mod:`.search` (direction scan, kernel grid,
coordinate descent; resumable) → :mod:`.pipeline` (the front checked by generation, the pick) →
:mod:`.outputs` / :mod:`.exports` (merged checkpoint, front.json/png, PEFT LoRA, GGUF control vector, model card).
Imports core, direction and evaluation.
"""
