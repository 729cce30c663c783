"""Stage 2, the refusal direction (Arditi et al. 2024, "Refusal in LMs is mediated by a single direction").

prompts → :mod:`.activations` (mean residuals at every layer × post-instruction position) → candidates
(difference in means, :mod:`.compute`) → :mod:`.selection` / :mod:`.selection_passes` (bypass, induce and KL
scores with the paper's filters; the refusal score lives in :mod:`.scoring`) → the chosen direction →
:mod:`.interventions` (directional ablation, activation addition, as hooks) and :mod:`.orthogonalize`
(the same ablation as a weight edit, saved as a normal HF checkpoint). Imports only :mod:`refusal_lens.core`.
"""
