"""
The optimizers beside torch's AdamW: Muon for the blocks' matrices, and several optimizers over
disjoint parameters stepped as one; configure_optimizers puts a GPT's parameters into them, and
make_optimizer builds a training run's from its config.

    from homegpt.optimizers import ChainedOptimizer, Muon
    opt = ChainedOptimizer(torch.optim.AdamW(groups_a), Muon(groups_b))
    opt.step(); opt.zero_grad(); sd = opt.state_dict()

Clipping, the GradScaler and the name-keyed checkpoints (checkpoint.optimizer_tensors) see one
optimizer: param_groups, state_dict() and load_state_dict() span all of them in order, numbered as
one torch optimizer numbers its parameters.
"""

import torch

from homegpt import runtime

OPTIMIZERS = ("adamw", "adamw8bit", "muon")  # the names train.py, bench.py and memory.py accept


def optimizer_problems(name, device):
    """What stops optimizer `name` on `device` ('auto', 'cpu', 'cuda', ...), as messages for a config
    check made before any work: an unknown name, or 8-bit AdamW without bitsandbytes (0.50+ on a CPU)."""
    if name not in OPTIMIZERS:
        return [f"optimizer must be {', '.join(map(repr, OPTIMIZERS[:-1]))} or {OPTIMIZERS[-1]!r}, got {name!r}"]
    problems = []
    if name == "adamw8bit":
        import importlib.util
        import torch
        kind = str(device).split(":")[0]
        on_cpu = kind == "cpu" or (device == "auto" and not torch.cuda.is_available())
        if kind == "mps":
            problems.append("optimizer='adamw8bit' has no Apple GPU kernels in bitsandbytes; use optimizer='adamw'")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes, or optimizer='adamw'")
        elif on_cpu:
            from importlib.metadata import version
            v = version("bitsandbytes")
            # CPU kernels for the 8-bit optimizers: checked on 0.50.2 (tests/test_checkpoint.py)
            if tuple(int(x) for x in v.split(".")[:2] if x.isdigit()) < (0, 50):
                problems.append(f"optimizer='adamw8bit' on a CPU needs bitsandbytes 0.50 or newer (found {v}): "
                                f"pip install -U bitsandbytes, or optimizer='adamw'")
    return problems


class ChainedOptimizer:
    """Several torch optimizers over disjoint parameters, stepped as one (see the module docstring)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [g | {"params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state has {len(sd['param_groups'])} parameter groups, this optimizer "
                             f"{len(self.param_groups)}: it was saved by another optimizer")
        first_group, offset = 0, 0
        for o in self.optimizers:
            groups = sd["param_groups"][first_group:first_group + len(o.param_groups)]
            ids = [i for g in groups for i in g["params"]]
            o.load_state_dict({"state": {i - offset: sd["state"][i] for i in ids if i in sd["state"]},
                               "param_groups": [g | {"params": [i - offset for i in g["params"]]} for g in groups]})
            first_group += len(groups)
            offset += len(ids)


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with its Newton-Schulz orthogonalisation in float32 where bfloat16 matmuls
    are emulated: torch runs those iterations in bfloat16, which on a CPU without AVX512-BF16/AMX (an
    AVX2 laptop or server) or a GPU before Ampere is several times slower than float32, enough to make
    the CPU recipe's steps several times slower than with AdamW (docs/cpu_recipe.md). Where bfloat16 is
    native, torch's own path runs unchanged. Updates, momentum and state are torch's either way."""

    @torch.no_grad()
    def step(self, closure=None):
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if native_bf16(device):
            return super().step(closure)
        import torch.optim._muon as impl
        bf16 = impl._zeropower_via_newtonschulz
        impl._zeropower_via_newtonschulz = newton_schulz_float32  # for the length of this step
        try:
            return super().step(closure)
        finally:
            impl._zeropower_via_newtonschulz = bf16


def newton_schulz_float32(grad, ns_coefficients, ns_steps, eps):
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Jordan et al. 2024), same
    coefficients and steps, in float32: an approximately orthogonal matrix with grad's singular vectors.

    x is m x n with m <= n (a tall grad is transposed). Each step is x <- (a + b A + c A^2) x with
    A = x x^T, so x_k = q_k x_0 where q_k is a polynomial in A_0 = x_0 x_0^T, m x m, and symmetric; and
    A_k = q_k A_0 q_k. For an oblong matrix (n > 1.5 m) the steps run on those m x m matrices alone,
    touching x_0 twice (A_0, then q x_0): 4 m^2 n + 34 m^3 flops for 5 steps against 20 m^2 n + 10 m^3,
    0.56x for a 192 x 768 MLP matrix (the "Gram" form of the iteration; the same result to float32's
    rounding, tests/test_model.py). A square matrix keeps the direct form, cheaper there."""
    a, b, c = ns_coefficients
    x = grad.float()
    wide = grad.size(0) > grad.size(1)
    x = x.T if wide else x
    m, n = x.shape
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    if 2 * n <= 3 * m:
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if wide else x
    gram0 = x @ x.T
    q = None  # None: the identity, before the first step
    for _ in range(ns_steps):
        gram = gram0 if q is None else q @ gram0 @ q
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal().add_(a)  # a I + b A + c A^2
        q = p if q is None else p @ q
    x = x if q is None else q @ x
    return x.T if wide else x


def native_bf16(device):
    """True when the device computes bfloat16 matmuls natively (runtime decides: the CPU's
    AVX512-BF16/AMX, the GPU's compute capability)."""
    if device.type == "cuda":
        return runtime.cuda_has_bf16(device)[0]
    return device.type == "cpu" and runtime.cpu_has_bf16()


def make_optimizer(model, cfg, device, fused=None):
    """The run's optimizer over the model's trainable parameters (configure_optimizers)."""
    return configure_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type,
                                      fused=fused, eight_bit=cfg.optimizer == "adamw8bit",
                                      muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else 0.0,
                                      muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, fused=None, eight_bit=False,
                         muon_lr=0.0, muon_momentum=0.95, muon_weight_decay=0.0):
    """AdamW with decay on >=2-D weights only (matmuls, embeddings), never on biases or LayerNorm gains.

    Frozen parameters (requires_grad False, e.g. a LoRA base) are left out entirely.
    muon_lr > 0: the blocks' weight matrices go to Muon (torch's, momentum orthogonalised by
    Newton-Schulz, Jordan et al. 2024) at muon_lr, and AdamW keeps the embeddings, lm_head,
    biases and gains; the two step as one ChainedOptimizer. Every group carries "lr_scale", its
    learning rate relative to learning_rate, so a schedule sets group["lr"] = lr * group["lr_scale"].
    """
    params = [p for p in model.parameters() if p.requires_grad]
    muon = muon_matrices(model) if muon_lr > 0 else []
    muon_ids = {id(p) for p in muon}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in muon_ids]
    no_decay = [p for p in params if p.dim() < 2]
    assert len(muon) + len(decay) + len(no_decay) == len(params), "every trainable parameter must be in one group"
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if eight_bit:
        # 8-bit optimizer states (Dettmers et al. 2021): 2 bytes per parameter instead of 8
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"optimizer='adamw8bit' runs on CUDA or a CPU (bitsandbytes), not {device_type}")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas)
    if fused is None:
        # the fused kernel is a single launch per step on CUDA; on CPU torch's fused AdamW also wins
        fused = device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
    if muon_lr <= 0:
        return adamw
    if not muon:
        raise ValueError("optimizer='muon' needs trainable weight matrices in the blocks (none here: "
                         "train_1d_only?); use optimizer='adamw'")
    return ChainedOptimizer(adamw, Muon(
        [{"params": muon, "lr_scale": muon_lr / learning_rate}], lr=muon_lr,
        momentum=muon_momentum, weight_decay=muon_weight_decay))

def muon_matrices(model):
    """The trainable weight matrices inside the blocks: what optimizer='muon' gives to Muon
    (embeddings and lm_head are lookups/readouts, not hidden transforms, and stay with AdamW)."""
    return [p for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and n.startswith("transformer.h.")]
