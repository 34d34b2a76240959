"""DP-SGD at a site (Abadi et al. 2016) through Opacus: Poisson-sampled batches, each sample's gradient
clipped to L2 norm C, Gaussian noise of std sigma*C added to the sum, divided by the expected batch size.

    validate_model(model)                                   ConfigError naming the layer and the fix
    poisson_batches(n, q, steps, generator)                 index tensors, each item in with probability q
    physical_batch_size(n, q)                               the fixed batch a Poisson batch is padded to
    DPSGD(model, optimizer, noise_multiplier=, max_grad_norm=, expected_batch_size=, generator=)
        .step(x, y)                                         one DP step (x may hold no items)
        .close()                                            model back to a plain nn.Module
    dp_train(model, x, y, steps=, sample_rate=, ...)        one site's local DP training, in memory
    make_optimizer(model, name, lr, ...)                    the torch optimizer, DP or not

One module per job, all re-exported here: `model_check` (validate_model), `sampling` (the batches),
`exact` (clipping and noise, exact under any weights, as Opacus optimizer stages), `dp_step` (DPSGD),
`dp_training` (dp_train), `optimizers` (make_optimizer).

Pure: nothing here knows about rounds, runners or files. Per-sample gradients come from Opacus'
GradSampleModule (`grad_sample_mode` "hooks", "functorch", "ew") or its ghost-clipping module
("ghost"); clipping, noise and scaling are Opacus' DPOptimizer stages, with the clipping and noise
stages overridden to be exact under any weights (ExactDPOptimizer): a patient whose gradient is not
finite counts as zero, norms and sums are float64, and the noise is float64 on a grid, rounded once.
Every mode clips per patient: ghost mode needs the criterion's per-patient losses (reduction
"none"), and a criterion that cannot give them (or, like the Cox loss, has none) is refused, not run.
"""

from __future__ import annotations

from privmed.privacy.dp_step import (
    CLIP_MARGIN,
    DEFAULT_GRAD_SAMPLE_MODE,
    DPSGD,
    GRAD_SAMPLE_MODES,
    check_grad_sample_mode,
)
from privmed.privacy.dp_training import dp_train
from privmed.privacy.exact import (
    GRID_BITS,
    MAX_BATCH,
    MAX_NOISE_MULTIPLIER,
    MAX_NORM_RATIO,
    MIN_NOISE_MULTIPLIER,
    ExactDPOptimizer,
    ExactFastGradientClipping,
    Float64Scratch,
    clip_factors,
    clipped_sum,
    grid_spacing,
    in_range_targets,
    kept_rows,
    noised_sum,
    per_sample_norms,
)
from privmed.privacy.model_check import validate_model
from privmed.privacy.optimizers import OPTIMIZERS, make_optimizer
from privmed.privacy.sampling import PAD_TAIL, patient_batches, physical_batch_size, poisson_batches

__all__ = [
    "CLIP_MARGIN", "DEFAULT_GRAD_SAMPLE_MODE", "DPSGD", "GRAD_SAMPLE_MODES", "GRID_BITS", "MAX_BATCH",
    "MAX_NOISE_MULTIPLIER", "MAX_NORM_RATIO", "MIN_NOISE_MULTIPLIER", "OPTIMIZERS", "PAD_TAIL",
    "ExactDPOptimizer", "ExactFastGradientClipping", "Float64Scratch", "check_grad_sample_mode",
    "clip_factors", "clipped_sum", "dp_train", "grid_spacing", "in_range_targets", "kept_rows",
    "make_optimizer", "noised_sum", "patient_batches", "per_sample_norms", "physical_batch_size",
    "poisson_batches", "validate_model",
]
