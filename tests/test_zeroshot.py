"""Zero-shot class embeddings: hand computation, presets, template forms, on-disk cache."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("open_clip")

from deltakern.clip import zeroshot  # noqa: E402
from deltakern.clip.models import TINY_MODEL, load_model  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(TINY_MODEL, "none", seed=3)


def hand_embeddings(clip, classnames, prompts_for) -> torch.Tensor:
    """One prompt at a time: encode, normalise, average over templates, renormalise (float64)."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            embs = []
            for text in prompts_for(name):
                e = clip.model.encode_text(clip.tokenizer([text]))[0].double()
                embs.append(e / e.norm())
            mean = torch.stack(embs).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_builder_matches_hand_computation(clip):
    classnames = ["golden retriever", "tabby cat", "space shuttle", "a", "tree frog"]
    templates = ["a photo of a {}.", "a blurry {c} in the wild", lambda c: f"art of the {c}!"]
    W = zeroshot.build_class_embeddings(clip.model, clip.tokenizer, classnames, templates, classes_per_batch=2)
    expected = hand_embeddings(
        clip, classnames, lambda c: [f"a photo of a {c}.", f"a blurry {c} in the wild", f"art of the {c}!"]
    )
    assert W.shape == (5, clip.embed_dim) and W.dtype == torch.float32
    torch.testing.assert_close(W.double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(5), rtol=0, atol=1e-6)


def test_batching_does_not_change_the_result(clip):
    classnames = [f"class {i}" for i in range(7)]
    templates = zeroshot.template_preset("simple")
    one = zeroshot.build_class_embeddings(clip.model, clip.tokenizer, classnames, templates, classes_per_batch=1)
    all_ = zeroshot.build_class_embeddings(clip.model, clip.tokenizer, classnames, templates, classes_per_batch=7)
    torch.testing.assert_close(one, all_, rtol=0, atol=2e-6)


def test_presets_and_template_forms():
    assert len(zeroshot.template_preset("openai")) == 80
    assert len(zeroshot.template_preset("simple")) == 7
    assert zeroshot.template_preset("single") == ("a photo of a {}.",)
    names = zeroshot.imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert zeroshot.render("a {} b", "dog") == zeroshot.render("a {c} b", "dog") == "a dog b"
    assert zeroshot.templates_hash(["a {}.", "b {c}"]) == zeroshot.templates_hash([lambda c: f"a {c}.", "b {}"])
    assert zeroshot.templates_hash(["a {}."]) != zeroshot.templates_hash(["an {}."])


def test_bad_templates_and_classnames(clip):
    with pytest.raises(ValueError, match="templates must contain"):
        zeroshot.build_class_embeddings(clip.model, clip.tokenizer, ["dog"], ["no placeholder"])
    with pytest.raises(TypeError, match="templates must be strings or callables"):
        zeroshot.build_class_embeddings(clip.model, clip.tokenizer, ["dog"], [3])
    with pytest.raises(ValueError, match="classnames must contain at least one class name"):
        zeroshot.build_class_embeddings(clip.model, clip.tokenizer, [], ["a {}"])
    with pytest.raises(ValueError, match=r"classnames\[1\] must be a non-empty string"):
        zeroshot.build_class_embeddings(clip.model, clip.tokenizer, ["dog", " "], ["a {}"])
    with pytest.raises(ValueError, match="classes_per_batch"):
        zeroshot.build_class_embeddings(clip.model, clip.tokenizer, ["dog"], ["a {}"], classes_per_batch=0)
    with pytest.raises(ValueError, match="templates must be one of"):
        zeroshot.template_preset("eighty")


def test_cache_hits_and_keys(clip, tmp_path, monkeypatch):
    names, templates = ["dog", "cat", "car"], ["a photo of a {}.", "a {} drawing"]
    W = zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    torch.testing.assert_close(
        W, zeroshot.build_class_embeddings(clip.model, clip.tokenizer, names, templates), rtol=0, atol=0
    )

    # A hit reads the file: the text tower is not run again.
    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(zeroshot, "build_class_embeddings", no_build)
    again = zeroshot.cached_class_embeddings(clip, names, [lambda c: f"a photo of a {c}.", "a {c} drawing"], cache_dir=tmp_path, seed=3)
    assert torch.equal(again, W)
    # Other class names, templates or random-weight seed: another key.
    for kwargs in ({"classnames": ["dog", "cat"]}, {"templates": ["a {}"]}, {"seed": 4}):
        call = {"classnames": names, "templates": templates, "seed": 3, **kwargs}
        with pytest.raises(AssertionError, match="cache should have been used"):
            zeroshot.cached_class_embeddings(clip, call["classnames"], call["templates"], cache_dir=tmp_path, seed=call["seed"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cache_key_includes_the_autocast_dtype(clip, tmp_path, monkeypatch):
    # Class embeddings built under bf16 autocast differ from float32 ones: a run at one
    # precision must not be served the other's entry (the key of float32 entries is unchanged).
    key = zeroshot.cache_key("ViT-B-32", "openai", ["dog"], ["a {}."])
    assert "autocast" not in key and key == zeroshot.cache_key("ViT-B-32", "openai", ["dog"], ["a {}."], None)
    assert zeroshot.cache_key("ViT-B-32", "openai", ["dog"], ["a {}."], torch.bfloat16)["autocast"] == "bfloat16"
    names, templates = ["dog", "cat", "ship"], ["a photo of a {}."]
    fp32 = zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3)
    bf16 = zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3, autocast_dtype=torch.bfloat16)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not torch.equal(fp32, bf16)
    monkeypatch.setattr(zeroshot, "build_class_embeddings", lambda *a, **k: pytest.fail("cache should have been used"))
    again = zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3, autocast_dtype=torch.bfloat16)
    assert torch.equal(again, bf16)
    assert torch.equal(zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3), fp32)


def test_cache_key_includes_the_model_name(clip, tmp_path, monkeypatch):
    # Two models with the same embedding width and the same weights tag must not share an
    # entry: the model name is part of the key.
    key = zeroshot.cache_key("ViT-B-32", "openai", ["dog"], ["a {}."])
    assert key["model"] == "ViT-B-32"
    assert key != zeroshot.cache_key("ViT-B-32-quickgelu", "openai", ["dog"], ["a {}."])
    names, templates = ["dog", "cat"], ["a photo of a {}."]
    zeroshot.cached_class_embeddings(clip, names, templates, cache_dir=tmp_path, seed=3)
    built = []
    real_build = zeroshot.build_class_embeddings
    monkeypatch.setattr(zeroshot, "build_class_embeddings", lambda *a, **k: built.append(1) or real_build(*a, **k))
    renamed = dataclasses.replace(clip, name=clip.name + "-twin")  # same tower, same width, same seed
    zeroshot.cached_class_embeddings(renamed, names, templates, cache_dir=tmp_path, seed=3)
    assert built == [1], "a model with another name was served the first model's cache entry"
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
