"""Stage 4, reading the direction through SAEs (Kissane et al. 2024; Lee, Breck, Arditi 2025).

SAE + direction → :mod:`.decompose` (how faithfully and sparsely an SAE reconstructs r) and :mod:`.latents`
(ablating, adding, clamping latents); the refusal gradient → :mod:`.upstream` (latents upstream of refusal),
checked by :mod:`.validation` (steering), :mod:`.sensitivity`, :mod:`.ground_truth` (planted word-level
answers) and :mod:`.mediation` (activation patching of a word's effect); :mod:`.dashboards` shows latents;
:mod:`.pipeline` runs the whole lens for the demo. Imports core, direction, evaluation and sae.
"""
