"""The training losses: pure, single-process tensor code, one concern per module (torchtune's layout).

    options            the option names every loss accepts, checked in one place; the float32 upcast
    representations    pooling hidden states to one vector per sequence, normalisation, calibration
    distances          the five distances between the harmful and the harmless set, and the forms S(D)
    tokens             the token terms: KL to the reference on harmless logits, next-token cross-entropy
    es2_loss           the ES2 objective: separation + KL leash + optional cross-entropy on harmful targets
    circuit_breakers   representation rerouting (Zou et al. 2024), the baseline trained under the same harness
    gather             the one place where the losses meet several processes; only the trainer calls it

No module here loads a model, reads a file or issues a collective: each takes the tensors of the whole
(global) batch and returns scalars and named intermediates. With N processes the trainer first turns its shard
into the global batch with `gather` (representations concatenated over ranks, token sums added), so a loss
computed on every rank equals the 1-process loss of the concatenated batch.

Hidden-state index convention
    Layer ``l`` is ``outputs.hidden_states[l]`` of an HF causal LM called with ``output_hidden_states=True``:
    ``0`` is the embedding output and ``l >= 1`` the output of decoder block ``l - 1`` (blocks counted from
    0). The last entry (``l = num_hidden_layers``) is taken *after* the final norm in HF Llama/Qwen2, so its
    scale is not comparable with the other layers (on SmolLM2 its norm is ~53 against ~640 just before).
    SCAV's code mixes these indices with decoder-block hooks; everything here uses ``hidden_states`` indices.

Notation (one layer)
    H in R^{n x D}: harmful representations, S in R^{m x D}: harmless ones; mu_H, mu_S their means;
    tr Sigma_H = (1/n) sum_i ||h_i - mu_H||^2 (population covariance trace, so n = 1 is allowed); same for S.
"""
