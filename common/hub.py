"""Model cards and Hub uploads of the exports (tokenizer, prior, assembled pipeline).

Every export folder gets a ``README.md`` model card (huggingface_hub ``ModelCard``): what the model is, its
key facts (quantizer, K, token grid, ...), how it was trained (data, steps, batch), the metrics that were
computed with their protocol, how to load it, and the licence. The same facts are stored in the card's
YAML metadata under ``lgq`` so that ``pipelines.assemble`` can summarise its components' cards.

``push_folder_to_hub`` uploads an export folder with huggingface_hub (``HfApi.create_repo`` +
``HfApi.upload_folder``); ``train.push_to_hub`` / ``train.hub_model_id`` and ``pipelines.assemble
--push-to-hub`` call it at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData

LICENSE = "apache-2.0"  # the project's licence (pyproject.toml); exports are released under it
CARD_FILE = "README.md"


@dataclass
class CardInfo:
    """The content of one model card.

    facts / training: (name, value) rows; metrics: (name, value) rows measured as ``metrics_protocol`` says
    (empty -> the card says that none were computed and how to compute them); usage: Python code.
    """

    kind: str  # "tokenizer" | "prior" | "pipeline"
    title: str
    description: str
    facts: list[tuple[str, Any]] = field(default_factory=list)
    training: list[tuple[str, Any]] = field(default_factory=list)
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    metrics_protocol: str = ""
    usage: str = ""
    tags: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        """Plain-JSON form stored under ``lgq`` in the card's YAML header."""
        rows = lambda items: [[str(k), _plain(v)] for k, v in items]  # noqa: E731
        return {"kind": self.kind, "title": self.title, "facts": rows(self.facts), "training": rows(self.training),
                "metrics": rows(self.metrics), "metrics_protocol": self.metrics_protocol}


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _table(rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    for name, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown.replace('|', '/')} |")
    return "\n".join(lines)


def render_model_card(info: CardInfo):
    """``CardInfo`` -> huggingface_hub ``ModelCard`` (YAML metadata + markdown body)."""
    data = ModelCardData(license=LICENSE, library_name="diffusers",
                         tags=["lgq", "image-tokenizer", "vector-quantization", *info.tags], lgq=info.metadata())
    if info.metrics:
        metrics = f"{_table(info.metrics)}\n\nProtocol: {info.metrics_protocol}"
    else:
        metrics = f"No metrics were computed for this export. {info.metrics_protocol}".strip()
    body = f"""# {info.title}

{info.description}

## Model

{_table(info.facts)}

## Training

{_table(info.training) if info.training else "See the components' model cards."}

## Metrics

{metrics}

## How to load

```python
{info.usage.strip()}
```

Made with [lgq](https://pypi.org/project/lgq/) (Learnable Geometric Quantization toolkit; method: Altun et al.,
"LGQ: Learning Discretization Geometry for Scalable and Stable Image Tokenization").

## Licence

{LICENSE} (the weights and this card).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def training_rows(cfg, trainer) -> list[tuple[str, object]]:
    """The training facts shared by the tokenizer and prior model cards."""
    return [("optimisation steps", trainer.step), ("global batch", trainer.images_per_step),
            ("processes", trainer.accelerator.num_processes), ("learning rate", cfg.train.lr),
            ("mixed precision", trainer.mixed_precision),
            ("weights", f"EMA (decay {cfg.train.ema_decay})" if cfg.train.ema_decay > 0 else "raw training weights")]


def write_model_card(folder: str | os.PathLike, info: CardInfo) -> Path:
    """Write ``folder/README.md``; returns its path."""
    path = Path(folder) / CARD_FILE
    render_model_card(info).save(str(path))
    return path


def read_card_metadata(folder: str | os.PathLike) -> dict | None:
    """The ``lgq`` metadata of ``folder/README.md`` (None if the folder has no card from this project)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None

    return ModelCard.load(str(path)).data.to_dict().get("lgq")


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False,
                       commit_message: str | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` (weights, configs, README.md) to it.

    Needs network access and a token (``huggingface-cli login`` or ``HF_TOKEN``); returns the repo URL.
    """
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"hub model id must look like 'name' or 'user/name', got {repo_id!r}")
    api = HfApi()
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=commit_message or f"Upload {Path(folder).name} (lgq)")
    return str(url)


__all__ = ["CardInfo", "render_model_card", "write_model_card", "read_card_metadata", "push_folder_to_hub", "LICENSE"]
