"""Analyses of bottlenecked vision transformers: capture, KL and activity, patch voting, mutual
information and NMI between heads, the repetition probe and the query-key SVD. Information in nats."""
from .activity import (
    TopPatches, active_dims, active_heads, information_per_image, information_per_patch, iterate_records, kl_map,
    max_kl, mean_information, survival_function, to_grid, top_patches)
from .capture import Record, attention_maps, capture, eval_mode, patch_logits
from .mutual_information import (
    Estimate, NMIMatrix, joint_mutual_information, log_density_matrix, mutual_information, mutual_information_uu,
    mutual_information_uv, nmi_matrix, normalized_mutual_information)
from .probes import RepetitionProbe, copy_patch, repetition_probe
from .qk_svd import QKSVD, optimal_attention_images, qk_maps, qk_svd
from .voting import (
    compare_models, inverse_simpson, js_distance, js_divergence, logit_range, patch_votes, patch_voting,
    top_fraction, vote_fractions)
