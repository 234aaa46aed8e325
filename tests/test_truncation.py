"""Exact text-sequence truncation (issue 16, item 5): the zero-shot builder runs causal text towers
on the first L tokens only, and gives the same embeddings as the tower's own ``encode_text``."""

from __future__ import annotations

import warnings

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from deltakern.clip import zeroshot  # noqa: E402
from deltakern.clip.models import TINY_MODEL, load_model  # noqa: E402

CLASSNAMES = ["tench", "goldfish", "great white shark", "a class with a much longer name than the rest"]
TEMPLATES = ["a photo of a {}.", "{}", "a blurry photo of the {}, seen from far away in poor light."]
# Relative difference allowed between truncated and full-context embeddings: only the order of
# floating-point sums differs (the issue measured 7.7e-7 for ViT-B-32).
RTOL = 1e-5


def _small_tower_cfg(**text_overrides) -> tuple[dict, dict]:
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **text_overrides}
    return vision, text


def _custom_text_clip(seed: int, **text_overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision, text = _small_tower_cfg(**text_overrides)
    return open_clip.CustomTextCLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def _clip(seed: int, **text_overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision, text = _small_tower_cfg(**text_overrides)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def _with_pad_mask(model: torch.nn.Module) -> torch.nn.Module:
    model.text.use_pad_mask = True  # not a CLIPTextCfg field in every open_clip release
    return model


def _with_mask(model: torch.nn.Module, value: float) -> torch.nn.Module:
    model.attn_mask = torch.full_like(model.attn_mask, value)  # every token attends to every other
    return model


def _tiny() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(TINY_MODEL, "none", seed=4).model


TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
EOT = TOKENIZER.eot_token_id if hasattr(TOKENIZER, "eot_token_id") else 49407

# Towers where truncation is exact: every supported open_clip text tower type and pooling.
EXACT = {
    "deltakern-tiny (open_clip.CLIP)": _tiny,
    "CLIP, argmax pooling": lambda: _clip(1),
    "CLIP, eos pooling": lambda: _clip(2, pool_type="eos", eos_id=EOT),
    "CustomTextCLIP + TextTransformer, argmax": lambda: _custom_text_clip(3),
    "CustomTextCLIP + TextTransformer, eos": lambda: _custom_text_clip(4, pool_type="eos", eos_id=EOT),
    "CustomTextCLIP + TextTransformer, Linear projection": lambda: _custom_text_clip(5, proj_type="linear"),
}
# Towers where it is not: they attend to later tokens or read another position.
NOT_EXACT = {
    "no causal mask, last-token pooling (SigLIP-like)": lambda: _custom_text_clip(6, no_causal_mask=True, pool_type="last"),
    "no causal mask, argmax pooling": lambda: _custom_text_clip(14, no_causal_mask=True),
    "no causal mask: CLIP with an all-zero attention mask": lambda: _with_mask(_clip(15), 0.0),
    "causal, last-token pooling": lambda: _clip(7, pool_type="last"),
    "causal, first-token pooling": lambda: _custom_text_clip(8, pool_type="first"),
    "bidirectional with a padding mask": lambda: _with_pad_mask(_custom_text_clip(9, no_causal_mask=True, pool_type="argmax")),
    "CoCa-style appended class token": lambda: _custom_text_clip(10, embed_cls=True),
}


def _prompts() -> list[str]:
    return [t.format(c) for c in CLASSNAMES for t in TEMPLATES]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max()
    err = float((got - want).abs().max() / scale)
    assert err <= RTOL, f"truncated embeddings differ by {err:.2e} of the largest value (limit {RTOL})"


@pytest.mark.parametrize("name", list(EXACT))
def test_truncated_encoder_equals_encode_text(name):
    model = EXACT[name]()
    encoder = zeroshot.truncating_text_encoder(model)
    assert encoder is not None, f"{name}: truncation should be available"
    tokens = TOKENIZER(_prompts())
    with torch.no_grad():
        want = model.encode_text(tokens)
        got = encoder.encode_text(tokens)
        # One batch of short prompts only: L is that batch's own longest prompt.
        short = TOKENIZER(["a {}.".format(c) for c in CLASSNAMES[:2]])
        _assert_close(encoder.encode_text(short, normalize=True), model.encode_text(short, normalize=True))
    _assert_close(got, want)
    lengths = (tokens == EOT).int().argmax(dim=1) + 1
    assert int(lengths.max()) < tokens.shape[1] // 2, "the test prompts should leave most positions as padding"


@pytest.mark.parametrize("name", list(EXACT))
def test_zero_shot_builder_matches_the_full_context(name):
    model = EXACT[name]()
    full = zeroshot.build_class_embeddings(model, TOKENIZER, CLASSNAMES, TEMPLATES, classes_per_batch=3, truncate=False)
    seen = []  # sequence lengths the text transformer runs on
    transformer = zeroshot._text_tower(model)[0].transformer
    hook = transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    cut = zeroshot.build_class_embeddings(model, TOKENIZER, CLASSNAMES, TEMPLATES, classes_per_batch=3)
    hook.remove()
    # Two batches (3 + 1 classes), each cut after its own last end-of-text token.
    longest = [int(((TOKENIZER(_prompts()[i * 9:(i + 1) * 9]) == EOT).int().argmax(dim=1) + 1).max()) for i in (0, 1)]
    assert seen == longest, f"the transformer ran on {seen} tokens, expected {longest}"
    _assert_close(cut, full)


@pytest.mark.parametrize("name", list(NOT_EXACT))
def test_towers_where_truncation_is_not_exact_use_encode_text(name, monkeypatch):
    model = NOT_EXACT[name]()
    assert zeroshot.truncating_text_encoder(model) is None
    tokens = TOKENIZER(_prompts())
    with torch.no_grad():
        full_context = model.encode_text(tokens)
        if name.startswith("no causal"):
            # What truncation would have got wrong: these towers see the padding.
            cut = tokens.clone()
            cut[:, 20:] = 0
            assert not torch.allclose(model.encode_text(cut), full_context)
    # The builder falls back to the tower's own encode_text: bit-identical to truncate=False.
    calls = []
    original = type(model).encode_text
    monkeypatch.setattr(type(model), "encode_text", lambda self, t, normalize=False: calls.append(t.shape) or original(self, t, normalize))
    got = zeroshot.build_class_embeddings(model, TOKENIZER, CLASSNAMES, TEMPLATES)
    monkeypatch.undo()
    assert calls and all(shape[1] == 77 for shape in calls)
    want = zeroshot.build_class_embeddings(model, TOKENIZER, CLASSNAMES, TEMPLATES, truncate=False)
    assert torch.equal(got, want)


def test_subclasses_and_patched_encoders_are_not_truncated():
    class MyCLIP(open_clip.CLIP):  # may change the text forward
        pass

    vision, text = _small_tower_cfg()
    assert zeroshot.truncating_text_encoder(MyCLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)) is None
    model = _clip(11)
    model.encode_text = lambda text, normalize=False: torch.zeros(text.shape[0], 24)
    assert zeroshot.truncating_text_encoder(model) is None
    assert bool((zeroshot.build_class_embeddings(model, TOKENIZER, CLASSNAMES[:1], TEMPLATES[:1], truncate=True)
                 .isnan()).all())  # the patched (zero) encoder really was used: 0/0 after normalising


def test_a_prompt_that_fills_the_context_keeps_the_full_length():
    model = _clip(12)
    encoder = zeroshot.truncating_text_encoder(model)
    tokens = TOKENIZER(["word " * 100, "a photo of a cat."])  # the first is cut to 77 tokens, EOT last
    with torch.no_grad():
        _assert_close(encoder.encode_text(tokens), model.encode_text(tokens))


def test_truncate_must_be_a_bool():
    from deltakern.core.errors import InvalidArgumentType

    with pytest.raises(InvalidArgumentType, match="truncate"):
        zeroshot.build_class_embeddings(_clip(13), TOKENIZER, CLASSNAMES, TEMPLATES, truncate=1)


# ----------------------------------------------------------------------------- the prompt learner
# Its learned context makes prompts longer than the zero-shot ones; L follows the real lengths.

LEARNER_EXACT = ["deltakern-tiny (open_clip.CLIP)", "CLIP, eos pooling", "CustomTextCLIP + TextTransformer, argmax"]


def _learner_run(learner) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    seen = []
    tower = learner.model.text if hasattr(learner.model, "text") else learner.model
    hook = tower.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        out = learner()
        (out.float() ** 2).sum().backward()
    finally:
        hook.remove()
    return out.detach(), learner.ctx.grad.clone(), seen


@pytest.mark.parametrize("name", LEARNER_EXACT)
@pytest.mark.parametrize("init,n_ctx,position", [("a photo of a", None, "end"), (None, 16, "middle")])
def test_prompt_learner_truncates_exactly(name, init, n_ctx, position):
    from deltakern.prompt.learner import PromptLearner

    model = EXACT[name]()
    full = PromptLearner(model, CLASSNAMES, n_ctx=n_ctx, init=init, class_token_position=position, truncate=False)
    cut = PromptLearner(model, CLASSNAMES, n_ctx=n_ctx, init=init, class_token_position=position)
    assert torch.equal(full.ctx, cut.ctx)
    out_full, grad_full, seen_full = _learner_run(full)
    out_cut, grad_cut, seen_cut = _learner_run(cut)
    _assert_close(out_cut, out_full)
    _assert_close(grad_cut, grad_full)
    longest = int((cut.tokens == EOT).int().argmax(dim=1).max()) + 1
    assert seen_full == [77] and seen_cut == [longest] and longest < 77


def test_prompt_learner_keeps_the_full_context_where_truncation_is_not_exact():
    from deltakern.prompt.learner import PromptLearner

    model = NOT_EXACT["no causal mask, argmax pooling"]()
    learner = PromptLearner(model, CLASSNAMES)
    assert learner._truncating is None
    *_, seen = _learner_run(learner)
    assert seen == [77]
