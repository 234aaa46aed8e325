"""The CoOp-style prompt learner: learned context vectors in every class prompt of a frozen
open_clip text tower; ``learner()`` -> ``[K, D]`` class embeddings with gradient to the context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from deltakern.clip.zeroshot import truncating_text_encoder
from deltakern.core.errors import InvalidArgument, InvalidArgumentType
from deltakern.core.validation import check_bool, check_choice, check_classnames, check_int_range

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
DEFAULT_INIT = "a photo of a"
DEFAULT_N_CTX = 16  # CoOp's context length for random initialisation
CTX_INIT_STD = 0.02  # CoOp's std for randomly initialised context vectors
_PLACEHOLDERS = ("X", "Z")


def _text_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """``(kind, token_embedding)`` of a supported open_clip text tower, else a TypeError.

    ``"clip"``: open_clip.CLIP, whose text transformer lives on the model itself;
    ``"text"``: CustomTextCLIP / CoCa, whose ``model.text`` is an open_clip TextTransformer.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        return "clip", model.token_embedding
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return "text", text.token_embedding
    tower = type(text).__name__ if text is not None else type(model).__name__
    raise InvalidArgumentType(
        "model must be an open_clip model with a built-in text transformer (open_clip.CLIP, or "
        "CustomTextCLIP/CoCa with an open_clip TextTransformer text tower); got a "
        f"{type(model).__name__} whose text tower is {tower}. Hugging Face text towers (HFTextEncoder) "
        "are not supported: their prompts cannot take learned context vectors here"
    )


def _prompt(classname: str, n_ctx: int, position: str, placeholder: str) -> str:
    """The prompt text with ``n_ctx`` placeholder words where the context vectors go."""
    if position == "end":
        return " ".join([placeholder] * n_ctx + [classname]) + "."
    if position == "front":
        return " ".join([classname] + [placeholder] * n_ctx) + "."
    half = n_ctx // 2
    return " ".join([placeholder] * half + [classname] + [placeholder] * (n_ctx - half)) + "."


def _init_token_ids(tokenizer: Callable, text: str) -> torch.Tensor:
    """The token ids of ``text``'s words, without start/end/padding tokens.

    Tokenizers differ in their special tokens, so the words are found by aligning the
    tokenization of ``text`` with that of the empty string: the words are what ``text`` inserts.
    """
    full = tokenizer([text])[0]
    empty = tokenizer([""])[0]
    start = 0
    while start < len(full) and full[start] == empty[start]:
        start += 1
    for n in range(1, len(full) - start + 1):
        if torch.equal(full[start + n:], empty[start:len(empty) - n]):
            return full[start:start + n].clone()
    raise InvalidArgument(f"init {text!r} does not fit the tokenizer's context length {len(full)}")


class PromptLearner(nn.Module):
    """Learned prompt context (CoOp) for an open_clip model; ``forward()`` -> ``[K, D]``.

    Each class prompt is ``n_ctx`` context slots plus the class name and a full stop; the slots
    hold the learnable vectors ``ctx [n_ctx, width]``, shared by all classes, in place of word
    embeddings. ``class_token_position`` puts the class name after the context (``"end"``,
    CoOp's default), before it (``"front"``) or in its middle (``"middle"``).

    ``init`` (default ``"a photo of a"``) initialises the context from those words' token
    embeddings, and then ``n_ctx`` defaults to (and must equal) their token count; with
    ``init=None`` the context is drawn from N(0, 0.02²) with a generator seeded by ``seed``
    and ``n_ctx`` defaults to 16.

    Supported text towers: open_clip ``CLIP`` and ``CustomTextCLIP``/``CoCa`` with an open_clip
    ``TextTransformer`` (any pooling, projection, attention mask or tokenizer they use); Hugging
    Face text towers raise a TypeError. ``tokenizer`` must be the model's
    (``open_clip.get_tokenizer(name)``); by default open_clip's CLIP tokenizer with the model's
    context length.

    With ``freeze=True`` (default) every parameter of ``model`` stops requiring gradients and the
    model is kept in eval mode (also by :meth:`train`), so that only ``ctx`` is trained and
    BatchNorm statistics never move. The model is a submodule: ``learner.to(device)`` moves it.

    ``truncate=True`` (default): where it is exact (a causal tower read at the end-of-text token,
    :func:`deltakern.clip.zeroshot.truncating_text_encoder`), the text transformer runs on the
    prompts' first L tokens only, L = the longest prompt's end-of-text position + 1 (the learned
    context makes prompts longer, and L follows them), instead of the whole context; the class
    embeddings and their gradients are the same up to floating-point summation order.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int | None = None,
        init: str | None = DEFAULT_INIT,
        class_token_position: str = "end",
        *,
        tokenizer: Callable | None = None,
        freeze: bool = True,
        seed: int = 0,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        names = check_classnames(classnames)
        check_choice("class_token_position", class_token_position, CLASS_TOKEN_POSITIONS)
        check_bool("freeze", freeze)
        check_bool("truncate", truncate)
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise InvalidArgument(f"init must be None or a non-empty string of context words, got {init!r}")
        kind, embedding = _text_tower(model)
        if tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=model.context_length)
        width = embedding.weight.shape[1]
        device = embedding.weight.device

        if init is not None:
            init_ids = _init_token_ids(tokenizer, init)
            if n_ctx is None:
                n_ctx = len(init_ids)
            elif n_ctx != len(init_ids):
                raise InvalidArgument(
                    f"n_ctx must equal the number of tokens of init {init!r} ({len(init_ids)}) or be None, "
                    f"got {n_ctx}; pass init=None for {n_ctx} randomly initialised context vectors"
                )
            with torch.no_grad():
                ctx = embedding(init_ids.to(device)).detach().float()
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            check_int_range("n_ctx", n_ctx, 1, 10_000)
            generator = torch.Generator().manual_seed(int(seed))
            ctx = (torch.randn(n_ctx, width, generator=generator) * CTX_INIT_STD).to(device)

        tokens = tokenizer([_prompt(n, n_ctx, class_token_position, _PLACEHOLDERS[0]) for n in names])
        other = tokenizer([_prompt(n, n_ctx, class_token_position, _PLACEHOLDERS[1]) for n in names])
        padding = tokenizer([""])[0, -1]
        slots = tokens != other
        for k, name in enumerate(names):
            # A prompt that fills the whole context was truncated (its class name or end token lost).
            if int(slots[k].sum()) != n_ctx or tokens[k, -1] != padding:
                raise InvalidArgument(
                    f"classnames[{k}] {name!r}: the prompt with {n_ctx} context tokens does not fit the "
                    f"tokenizer's context length {tokens.shape[1]}; use a shorter class name or fewer context tokens"
                )

        self.model = model
        self.classnames = names
        self.n_ctx = n_ctx
        self.init = init
        self.class_token_position = class_token_position
        self._tower_kind = kind
        # Not a submodule: it holds the model's own text tower, which .to() moves with the model.
        self._truncating = truncating_text_encoder(model) if truncate else None
        self.ctx = nn.Parameter(ctx)
        # Token ids drive the tower's pooling (end-token position) and padding masks; the slot
        # positions [K, n_ctx] say where the context vectors replace the placeholder embeddings.
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("ctx_positions", slots.nonzero()[:, 1].view(len(names), n_ctx).to(device), persistent=False)
        if freeze:
            model.requires_grad_(False)
            model.eval()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _token_embedding(self) -> nn.Module:
        return self.model.token_embedding if self._tower_kind == "clip" else self.model.text.token_embedding

    def forward(self) -> torch.Tensor:
        """Class embeddings ``[K, D]`` (not normalised) with gradient to ``ctx`` only."""
        ctx = self.ctx
        positions = self.ctx_positions

        def put_context(_module, _inputs, embedded: torch.Tensor) -> torch.Tensor:
            # Runs inside the tower's own encode_text: swap the placeholder word embeddings for the
            # context vectors (out of place, so the frozen embedding table is untouched).
            index = positions.unsqueeze(-1).expand(-1, -1, embedded.shape[-1])
            src = ctx.to(embedded.dtype).unsqueeze(0).expand(positions.shape[0], -1, -1)
            return embedded.scatter(1, index, src)

        handle = self._token_embedding().register_forward_hook(put_context)
        try:
            if self._truncating is not None:
                features = self._truncating.encode_text(self.tokens)
            elif self._tower_kind == "clip":
                features = self.model.encode_text(self.tokens)
            else:
                features = self.model.text(self.tokens)
                if isinstance(features, tuple):  # towers that also return token features (CoCa)
                    features = features[0]
        finally:
            handle.remove()
        return features

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """L2-normalised float32 class embeddings ``[K, D]``, detached."""
        return nn.functional.normalize(self().float(), dim=-1)

    def train(self, mode: bool = True) -> "PromptLearner":
        super().train(mode)
        self.model.eval()  # the frozen model never leaves eval mode (dropout off, BN stats fixed)
        return self

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, n_ctx={self.n_ctx}, width={self.ctx.shape[1]}, "
            f"init={self.init!r}, class_token_position={self.class_token_position!r}"
        )


