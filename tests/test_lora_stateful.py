"""Stateful property test of the LoRA library's public API: random sequences of the operations a user performs
(inject, merge, unmerge, the merged context, training steps, dtype conversions, state dicts, adapter files,
export, removal, deepcopy) on a tiny ViT, checked after every step against a shadow model kept by hand and the
plain formula ``base(x) + alpha/r * B(A(x))``."""
import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import tiny_vit
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from safetensors.torch import load_file
from torch import nn

import lora

LAYERS = [f"blocks.{i}.{part}" for i in range(2) for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["head"]
TARGETS = ("qkv", "proj", "fc1", "fc2", "head")
EXAMPLES = int(os.environ.get("LORA_STATEFUL_EXAMPLES", 40))
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative error of the output


def plain_vit() -> nn.Module:
    torch.manual_seed(0)  # the same base weights every time
    return tiny_vit(num_classes=3).eval()


class _Reference(nn.Module):
    """``base(x) + scaling * B(A(x))``, one adapter per output slice, the plain way."""

    def __init__(self, weight, bias, adapter):
        super().__init__()
        self.weight, self.bias, self.adapter = weight, bias, adapter

    def forward(self, x):
        a, b, s, r = self.adapter["A"], self.adapter["B"], self.adapter["splits"], self.adapter["r"]
        o = b.shape[0] // s
        parts = [x @ a[i * r:(i + 1) * r].T @ b[i * o:(i + 1) * o].T for i in range(s)]
        return F.linear(x, self.weight, self.bias) + self.adapter["alpha"] / r * torch.cat(parts, dim=-1)


def same(a, b) -> bool:
    """Whether two nests of lists and tuples hold equal values, tensors compared exactly (dtype included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def copy_shadow(nest):
    """A copy of a nest that later in-place changes to its tensors cannot reach."""
    if isinstance(nest, torch.Tensor):
        return nest.detach().clone()
    if isinstance(nest, (list, tuple)):
        return type(nest)(copy_shadow(x) for x in nest)
    return nest


def relative_error(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


class LoRAMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = plain_vit()
        self.dtype = torch.float32
        # The shadow: the unmerged base weights (plain keys), and each adapter's A, B, r, alpha, splits.
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.adapters: dict[str, dict] = {}
        self.merged_layers: set[str] = set()
        self.for_good: set[str] = set()  # layers merged without a kept weight: unmerge subtracts (not bit-exact)
        self.trainable = {n for n, _ in self.model.named_parameters()}
        # 24 images of 5 tokens: 120 rows, enough for the no-grad forward to fold the adapter into the weight
        self.x = torch.randn(24, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        self.dir = tempfile.TemporaryDirectory()
        self.snapshot = None
        # A weight merged in one dtype and converted to a finer one keeps the coarser one's rounding until unmerged.
        self.merged_tolerance = 0.0
        self.cached_reference = None

    def teardown(self):
        self.dir.cleanup()

    # ---- helpers ----
    def layers(self):
        return dict(lora.lora_layers(self.model))

    def reference(self) -> torch.Tensor:
        # Most steps leave the shadow as it was: its output is computed again only when the shadow changed.
        key = (list(self.base.values()), [(n, a["r"], a["alpha"], a["splits"], a["A"], a["B"])
                                          for n, a in sorted(self.adapters.items())])
        if self.cached_reference is None or not same(self.cached_reference[0], key):
            self.cached_reference = (copy_shadow(key), self.reference_output())
        return self.cached_reference[1]

    def reference_output(self) -> torch.Tensor:
        ref = plain_vit().double()
        ref.load_state_dict({k: v.double() for k, v in self.base.items()})
        for name, adapter in self.adapters.items():
            linear = ref.get_submodule(name)
            ad = dict(adapter, A=adapter["A"].double(), B=adapter["B"].double())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, _Reference(linear.weight, linear.bias, ad))
        with torch.no_grad():
            return ref(self.x.double())

    def output(self, model=None, rows=None) -> torch.Tensor:
        model = self.model if model is None else model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(self.x[:rows].to(self.dtype))
        finally:
            model.train(training)

    def fingerprint(self):
        """Everything a failed call must leave as it was."""
        return ({k: v.clone() for k, v in self.model.state_dict().items()},
                {n: (type(m), getattr(m, "merged", None)) for n, m in self.model.named_modules()})

    def assert_unchanged(self, before):
        after = self.fingerprint()
        assert before[1] == after[1], "the model's modules changed"
        assert before[0].keys() == after[0].keys()
        for k, v in before[0].items():
            assert torch.equal(v, after[0][k]), k

    def refused_without_adapters(self, call) -> bool:
        """Whether the model has no adapters, in which case ``call`` (a merge, an unmerge, an export or a removal)
        must be an error that says so and leave the model as it was."""
        if self.adapters:
            return False
        before = self.fingerprint()
        try:
            call()
        except ValueError as e:
            assert "has no LoRA layers" in str(e)
        else:
            raise AssertionError("merging or removing adapters the model does not have must be an error")
        self.assert_unchanged(before)
        return True

    def sync_from_model(self):
        """Takes the shadow from the model after an approximate step (a subtraction, a training step)."""
        state = self.model.state_dict()
        self.base = {k: v.detach().clone() for k, v in state.items() if "lora_" not in k}
        for name in self.adapters:
            self.adapters[name]["A"] = state[f"{name}.lora_A"].detach().clone()
            self.adapters[name]["B"] = state[f"{name}.lora_B"].detach().clone()

    # ---- rules ----
    @rule(names=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True),
          r=st.sampled_from([1, 2, 3]), alpha=st.sampled_from([1.0, 8.0, 16.0]),  # r <= the head's out (3)
          dropout=st.sampled_from([0.0, 0.1, 0.5]), splits=st.sampled_from([None, 1]))
    def inject(self, names, r, alpha, dropout, splits):
        targets = names
        matching = [n for n in LAYERS if n.rsplit(".", 1)[-1] in targets]
        before = self.fingerprint()
        if any(n in self.adapters for n in matching):
            try:
                lora.inject_lora(self.model, targets=targets, r=r, alpha=alpha, dropout=dropout, splits=splits)
            except ValueError as e:
                assert "already has a LoRA adapter" in str(e)
            else:
                raise AssertionError("injecting into an adapted layer must be an error")
            self.assert_unchanged(before)
            return
        names = lora.inject_lora(self.model, targets=targets, r=r, alpha=alpha, dropout=dropout, splits=splits)
        assert sorted(names) == sorted(matching)
        for name in names:
            layer = self.model.get_submodule(name)
            assert layer.lora_A.dtype == self.dtype and layer.training == self.model.training
            s = 3 if splits is None and name.endswith(".qkv") else 1  # the tiny ViT's qkv: out = 3 x in
            self.adapters[name] = dict(A=layer.lora_A.detach().clone(), B=layer.lora_B.detach().clone(), r=r,
                                       alpha=alpha, splits=s)
            self.trainable |= {f"{name}.lora_A", f"{name}.lora_B"}

    @precondition(lambda self: self.adapters)
    @rule(std=st.sampled_from([0.01, 0.1]), seed=st.integers(0, 3))
    def randomise_adapters(self, std, seed):
        """Sets every B (and A) as training would: through load_lora_state_dict, refused while merged."""
        g = torch.Generator().manual_seed(seed)
        state = {}
        for name, adapter in self.adapters.items():
            # A about as large as its Kaiming initialisation, B as after training: an update near the weight's size
            # (far larger, bf16's rounding of the merged weight is amplified by the attention's softmax)
            state[f"{name}.lora_A"] = (0.1 * torch.randn(adapter["A"].shape, generator=g)).to(self.dtype)
            state[f"{name}.lora_B"] = (std * torch.randn(adapter["B"].shape, generator=g)).to(self.dtype)
        merged = [n for n, l in self.layers().items() if l.merged]
        before = self.fingerprint()
        if merged:
            try:
                lora.load_lora_state_dict(self.model, state)
            except RuntimeError as e:
                assert "is merged" in str(e)
            else:
                raise AssertionError("loading adapter weights into a merged model must be an error")
            self.assert_unchanged(before)
            return
        assert sorted(lora.load_lora_state_dict(self.model, state)) == sorted(self.adapters)
        for name, adapter in self.adapters.items():
            adapter["A"], adapter["B"] = state[f"{name}.lora_A"], state[f"{name}.lora_B"]

    @rule(keep_unmerged=st.booleans())
    def merge(self, keep_unmerged):
        if self.refused_without_adapters(lambda: lora.merge_lora(self.model, keep_unmerged=keep_unmerged)):
            return
        merged_now = lora.merge_lora(self.model, keep_unmerged=keep_unmerged)
        assert sorted(merged_now) == sorted(n for n in self.adapters if n not in self.merged_layers)
        if not keep_unmerged:
            self.for_good |= set(merged_now)
        self.merged_layers |= set(merged_now)

    @rule(keep_buffer=st.booleans())
    def unmerge(self, keep_buffer):
        if self.refused_without_adapters(lambda: lora.unmerge_lora(self.model, keep_buffer=keep_buffer)):
            return
        names = lora.unmerge_lora(self.model, keep_buffer=keep_buffer)
        assert sorted(names) == sorted(self.merged_layers)
        self.merged_layers, self.merged_tolerance = set(), 0.0
        if self.for_good:
            self.for_good = set()
            self.check_base(approximate=True)
            self.sync_from_model()
        for layer in self.layers().values():
            assert not layer.merged and (keep_buffer or layer._merge_buffer is None)

    @precondition(lambda self: self.adapters)
    @rule(keep_buffer=st.booleans(), raise_inside=st.booleans())
    def merged_context(self, keep_buffer, raise_inside):
        want = self.output()
        already = set(self.merged_layers)
        try:
            with lora.merged(self.model, keep_buffer=keep_buffer):
                assert all(l.merged for l in self.layers().values())
                inside = self.output()
                assert relative_error(inside, want) < TOLERANCE[self.dtype]
                if raise_inside:
                    raise KeyError("inside")
        except KeyError:
            assert raise_inside
        for name, layer in self.layers().items():
            assert layer.merged == (name in already), name

    @rule(lr=st.sampled_from([0.01, 0.1]))
    def train_step(self, lr):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        # A merged layer refuses to train its adapters (no gradient) and a weight it would swap out at unmerge.
        merged_trainable = any(l.merged and (l.lora_A.requires_grad or l.lora_B.requires_grad
                                             or (l.weight.requires_grad and n not in self.for_good))
                               for n, l in self.layers().items())
        training = self.model.training
        before = self.fingerprint()
        self.model.train()
        optimizer = torch.optim.SGD(params, lr=lr)
        try:
            loss = self.model(self.x.to(self.dtype)).float().sin().mean()  # bounded: no step diverges
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        except RuntimeError as e:
            assert merged_trainable and "merged" in str(e), e
            self.model.train(training)
            self.assert_unchanged(before)
            return
        finally:
            optimizer.zero_grad(set_to_none=True)
        self.model.train(training)
        assert not merged_trainable, "a training forward through a merged layer with trainable adapters must fail"
        state = self.model.state_dict()
        named = dict(self.model.named_parameters())
        for key, value in before[0].items():
            if key in named and not named[key].requires_grad:
                assert torch.equal(state[key], value), f"frozen {key} changed"
        for name in self.adapters:
            if named[f"{name}.lora_A"].requires_grad:
                # B was zero or A got a gradient: at least one of the pair moves
                assert not (torch.equal(state[f"{name}.lora_A"], before[0][f"{name}.lora_A"])
                            and torch.equal(state[f"{name}.lora_B"], before[0][f"{name}.lora_B"])), name
        # What a training step trains must show in the state dict, merged or not (the unmerged weight).
        for name, layer in self.layers().items():
            if layer.merged and layer.weight.requires_grad:
                assert not torch.equal(state[f"{name}.weight"], before[0][f"{name}.weight"]), \
                    f"the step on merged {name}.weight does not show in its state dict"
        self.sync_from_model()

    @rule(training=st.booleans())
    def set_mode(self, training):
        self.model.train(training)
        for layer in self.layers().values():
            assert layer.lora_dropout.training == training

    @rule(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), how=st.sampled_from(["to", "method"]))
    def convert(self, dtype, how):
        if how == "to":
            self.model.to(dtype)
        else:
            getattr(self.model, {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bfloat16"}[dtype])()
        old, self.dtype = self.dtype, dtype
        if self.merged_layers:
            self.merged_tolerance = max(self.merged_tolerance, TOLERANCE[old])
        self.base = {k: v.to(dtype) for k, v in self.base.items()}
        for adapter in self.adapters.values():
            adapter["A"], adapter["B"] = adapter["A"].to(dtype), adapter["B"].to(dtype)
        for p in self.model.parameters():
            assert p.dtype == dtype
        if self.for_good:  # a merged weight rounded to the new dtype: its unmerge is approximate
            self.check_base(approximate=True, tolerance=max(TOLERANCE[old], TOLERANCE[dtype]))
            self.sync_from_model()

    @precondition(lambda self: self.adapters)
    @rule(into=st.sampled_from(["fresh", "same"]))
    def adapter_file_round_trip(self, into):
        path = Path(self.dir.name) / "adapter.safetensors"
        lora.save_adapter(self.model, path)
        saved = load_file(str(path))
        want = lora.lora_state_dict(self.model)
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
        if into == "fresh":
            fresh = plain_vit().to(self.dtype)
            fresh.load_state_dict({k: v for k, v in self.model.state_dict().items() if "lora_" not in k})
            loaded = lora.load_adapter(fresh, path)
            assert sorted(loaded) == sorted(self.adapters)
            got = lora.lora_state_dict(fresh)
            assert all(torch.equal(got[k], v) for k, v in want.items())
            assert relative_error(self.output(fresh), self.reference()) < TOLERANCE[self.dtype]
        else:  # the same weights again: nothing changes, and a merged model refuses them
            before = self.fingerprint()
            if self.merged_layers:
                try:
                    lora.load_adapter(self.model, path)
                except RuntimeError as e:
                    assert "is merged" in str(e), e
                else:
                    raise AssertionError("loading an adapter into a merged model must be an error")
            else:
                assert sorted(lora.load_adapter(self.model, path)) == sorted(self.adapters)
            self.assert_unchanged(before)

    @precondition(lambda self: self.adapters)
    @rule()
    def adapter_file_of_another_rank_is_refused(self):
        name = sorted(self.adapters)[0]
        other = plain_vit()
        r = self.adapters[name]["r"] + 1
        lora.inject_lora(other, targets=[name], r=r, alpha=self.adapters[name]["alpha"])
        path = Path(self.dir.name) / "other.safetensors"
        lora.save_adapter(other, path)
        before = self.fingerprint()
        try:
            lora.load_adapter(self.model, path, strict=False)
        except ValueError as e:
            assert name in str(e) and "r=" in str(e), e
        else:
            raise AssertionError("an adapter of another r must be refused")
        self.assert_unchanged(before)

    @rule()
    def export_merged(self):
        path = Path(self.dir.name) / "merged.safetensors"
        path.unlink(missing_ok=True)  # from an earlier export
        if self.refused_without_adapters(lambda: lora.save_merged(self.model, path)):
            assert not path.exists()
            return
        before = self.fingerprint()
        lora.save_merged(self.model, path)
        self.assert_unchanged(before)
        plain = plain_vit().to(self.dtype)
        plain.load_state_dict(load_file(str(path)), strict=True)
        assert relative_error(self.output(plain), self.reference()) < max(TOLERANCE[self.dtype], self.merged_tolerance)

    @rule(merge=st.booleans())
    def remove(self, merge):
        if self.refused_without_adapters(lambda: lora.remove_lora(self.model, merge=merge)):
            return
        if self.adapters and merge:
            want = self.output()
        names = lora.remove_lora(self.model, merge=merge)
        assert sorted(names) == sorted(self.adapters)
        assert not any(isinstance(m, lora.LoRALinear) for m in self.model.modules())
        plain = plain_vit().to(self.dtype)
        plain.load_state_dict(self.model.state_dict(), strict=True)
        for name in names:
            self.trainable -= {f"{name}.lora_A", f"{name}.lora_B"}
        if merge and self.adapters:
            assert relative_error(self.output(), want) < TOLERANCE[self.dtype] + 1e-5
            self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.for_good:
            self.check_base(approximate=True)
            self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.adapters, self.merged_layers, self.for_good = {}, set(), set()
        self.merged_tolerance = 0.0

    @rule()
    def take_snapshot(self):
        self.snapshot = ({k: v.clone() for k, v in self.model.state_dict().items()}, copy.deepcopy(self.base),
                         copy.deepcopy(self.adapters), self.dtype)

    @precondition(lambda self: self.snapshot is not None)
    @rule()
    def load_snapshot(self):
        state, base, adapters, dtype = self.snapshot
        own = self.model.state_dict()
        fits = state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own) and all(
            adapters[n]["r"] == a["r"] and adapters[n]["alpha"] == a["alpha"] and adapters[n]["splits"] == a["splits"]
            for n, a in self.adapters.items()) and adapters.keys() == self.adapters.keys()
        if not fits:
            return
        self.model.load_state_dict(state, strict=True)
        self.base = {k: v.to(self.dtype) for k, v in base.items()}
        for name, adapter in adapters.items():
            self.adapters[name] = dict(adapter, A=adapter["A"].to(self.dtype), B=adapter["B"].to(self.dtype))
        if self.for_good:  # merged again from the loaded weight: its unmerge subtracts
            self.check_base(approximate=True)

    @rule()
    def deepcopy(self):
        copied = copy.deepcopy(self.model)
        assert relative_error(self.output(copied), self.output()) == 0
        self.model = copied

    @rule(extra=st.booleans())
    def mark_trainable(self, extra):
        lora.mark_only_lora_as_trainable(self.model, extra=[self.model.norm] if extra else ())
        self.trainable = {f"{n}.lora_{ab}" for n in self.adapters for ab in "AB"}
        if extra:
            self.trainable |= {"norm.weight", "norm.bias"}

    @rule(requires_grad=st.booleans())
    def set_requires_grad(self, requires_grad):
        """Unfreezes (or freezes) every parameter, as a user switching to full fine-tuning does."""
        self.model.requires_grad_(requires_grad)
        self.trainable = {n for n, _ in self.model.named_parameters()} if requires_grad else set()

    @precondition(lambda self: self.adapters)
    @rule()
    def freeze_adapters(self):
        """Trains the rest of the model with the adapters fixed (a user tuning the head on a given adapter)."""
        for layer in self.layers().values():
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
        self.trainable -= {f"{n}.lora_{ab}" for n in self.adapters for ab in "AB"}

    @precondition(lambda self: self.adapters)
    @rule(what=st.sampled_from(["state_dict", "convert", "save_adapter", "deepcopy", "export"]))
    def inside_merged_context(self, what):
        """Another operation run inside ``merged(...)``: what it sees and leaves must be the unmerged model's."""
        already = set(self.merged_layers)
        with lora.merged(self.model):
            if what == "state_dict":
                self.check_base(approximate=bool(self.for_good))
                state = self.model.state_dict()
                self.model.load_state_dict(state)
            elif what == "convert":
                self.merged_tolerance = max(self.merged_tolerance, TOLERANCE[self.dtype])
                self.model.double()
                self.dtype = torch.float64
                self.base = {k: v.double() for k, v in self.base.items()}
                for adapter in self.adapters.values():
                    adapter["A"], adapter["B"] = adapter["A"].double(), adapter["B"].double()
            elif what == "save_adapter":
                self.adapter_file_round_trip("fresh")
            elif what == "deepcopy":
                copied = copy.deepcopy(self.model)
                lora.unmerge_lora(copied)
                for name, layer in lora.lora_layers(copied):
                    if name not in self.for_good:
                        assert torch.equal(layer.weight, self.base[f"{name}.weight"]), name
            else:
                self.export_merged()
        for name, layer in self.layers().items():
            assert layer.merged == (name in already), name
        if not already:
            self.merged_tolerance = 0.0
        if what == "convert" and self.for_good:
            self.sync_from_model()

    # ---- invariants ----
    def check_base(self, approximate=False, tolerance=None):
        state = self.model.state_dict()
        assert {k for k in state if "lora_" not in k} == self.base.keys()
        for key, want in self.base.items():
            if approximate:
                tolerance = tolerance or TOLERANCE[self.dtype]
                torch.testing.assert_close(state[key], want, rtol=tolerance * 10, atol=tolerance * 10, msg=key)
            else:
                assert state[key].dtype == want.dtype and torch.equal(state[key], want), key

    @invariant()
    def state_dict_means_the_unmerged_model(self):
        self.check_base(approximate=bool(self.for_good))
        state = self.model.state_dict()
        for name, adapter in self.adapters.items():
            assert torch.equal(state[f"{name}.lora_A"], adapter["A"]), name
            assert torch.equal(state[f"{name}.lora_B"], adapter["B"]), name

    @invariant()
    def unmerged_weights_are_the_base(self):
        for name, layer in self.layers().items():
            assert layer.merged == (name in self.merged_layers), name
            if not layer.merged and not self.for_good:
                assert torch.equal(layer.weight, self.base[f"{name}.weight"]), name

    @invariant()
    def output_is_the_reference(self):
        assert self.layers().keys() == self.adapters.keys()
        want, tolerance = self.reference(), max(TOLERANCE[self.dtype], self.merged_tolerance)
        assert relative_error(self.output(), want) < tolerance  # the no-grad forward folds the update
        assert relative_error(self.output(rows=2), want[:2]) < tolerance  # too few rows to fold

    @invariant()
    def trainable_set_is_what_was_marked(self):
        got = {n for n, p in self.model.named_parameters() if p.requires_grad}
        assert got == self.trainable


# The same sequences every run (derandomize), sized for the suite. To explore, LORA_STATEFUL_EXAMPLES=1000 (and
# derandomize=False, stateful_step_count=40, for new sequences each run).
LoRAMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=20, derandomize=True,
                                         deadline=None, database=None, report_multiple_bugs=False,
                                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_lora_api_sequences = LoRAMachine.TestCase
