"""The confounder dictionary Z with its prior P(z), the key of what produced it, and its file.

Paper: z_i is the centroid of cluster i of the masked scenes' features, P(z_i) = N_i / N_m its share of the samples;
the "random Z" ablation uses random vectors. A cached file is reused only by a run with an equal :class:`DictionaryKey`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ccim_lightning.checkpoints import TRUST_ADVICE, atomic_write, refused_globals, remove_stale_temporaries

__all__ = [
    "ConfounderDictionary",
    "DictionaryFileError",
    "DictionaryKey",
    "UnsafeDictionaryError",
    "check_cache_path",
    "dataset_fingerprint",
]

FORMAT_TAG = "ccim-lightning/confounder-dictionary"
FORMAT_VERSION = 3  # 3: the cache key stored as one typed record (DictionaryKey); 2: key fields among the metadata
SOURCES = ("features", "random")
_PRIOR_TOLERANCE = 1e-4


class DictionaryFileError(ValueError):
    """A dictionary file is damaged, foreign, of an unknown version or inconsistent."""


class UnsafeDictionaryError(DictionaryFileError):
    """A dictionary file's pickle needs Python globals that a weights-only load refuses to run (named)."""


@dataclass(frozen=True)
class DictionaryKey:
    """Everything that changes a dictionary: a cached file is reused only by a run whose key is equal.

    Attributes:
        extractor: Name of the scene CNN (:attr:`ContextFeatureExtractor.name`), ``"none"`` for random dictionaries.
        weights_digest: SHA-256 of the scene CNN's weights file, ``"random-init:<model>"``, or ``"none"``.
        num_prototypes: N.
        mask_subject: Whether the subject box was masked out of the context images.
        seed: Seed of the clustering (or of the random prototypes).
        source: ``"features"`` (clustered scene features) or ``"random"`` (the random-Z ablation).
        num_iterations: k-means Lloyd iterations (``None`` for random dictionaries).
        pca_dim: PCA size before k-means, or ``None`` (no PCA).
        transform: Canonical text of the dictionary transform (size, normalisation, mask fill), or ``"none"``.
        dataset_fingerprint: :func:`dataset_fingerprint` of the clustered samples, or ``"none"``.
    """

    extractor: str
    weights_digest: str
    num_prototypes: int
    mask_subject: bool
    seed: int
    source: str
    num_iterations: int | None
    pca_dim: int | None
    transform: str
    dataset_fingerprint: str

    def __post_init__(self) -> None:
        kinds = {"extractor": str, "weights_digest": str, "transform": str, "dataset_fingerprint": str}
        kinds |= {"num_prototypes": int, "seed": int, "mask_subject": bool, "source": str}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"DictionaryKey.{name} must be {kind.__name__}, got {value!r}")
        for name in ("num_iterations", "pca_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TypeError(f"DictionaryKey.{name} must be a positive int or None, got {value!r}")
        if self.num_prototypes < 1:
            raise ValueError(f"DictionaryKey.num_prototypes must be at least 1, got {self.num_prototypes}")
        if self.source not in SOURCES:
            raise ValueError(f"DictionaryKey.source must be one of {list(SOURCES)}, got {self.source!r}")

    @classmethod
    def for_random(cls, num_prototypes: int, seed: int) -> DictionaryKey:
        """The key of a random dictionary: only N and the seed matter."""
        return cls("none", "none", int(num_prototypes), False, int(seed), "random", None, None, "none", "none")

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what the file stores)."""
        return dataclasses.asdict(self)

    def differences(self, wanted: DictionaryKey, *, ignore: Iterable[str] = ()) -> list[str]:
        """Why ``wanted`` differs, e.g. ``"seed: cache has 0, run wants 1"``, per field not in ``ignore``."""
        skipped = set(ignore)
        if unknown := sorted(skipped - {f.name for f in dataclasses.fields(self)}):
            raise KeyError(f"Unknown DictionaryKey fields {unknown}.")
        return [
            f"{f.name}: cache has {getattr(self, f.name)!r}, run wants {getattr(wanted, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in skipped and getattr(self, f.name) != getattr(wanted, f.name)
        ]


@dataclass(eq=False)
class ConfounderDictionary:
    """Prototypes z_i of the confounder (scene context), their prior P(z_i), and the key they were built with.

    Build one with :meth:`from_clustering` or :meth:`random`; cache it with :meth:`save` / :meth:`load`. The
    tensors are checked on construction (shapes, finite values, a prior that is a distribution, N as in the key).

    Attributes:
        prototypes: (N, d) float32, z_i (cluster centroids, or random vectors for ``source="random"``).
        prior: (N,) float32, P(z_i) >= 0, summing to 1.
        key: The settings and data that produced it (:class:`DictionaryKey`).
        num_samples: Number of samples clustered (0 for random ones).
        inertia: Final clustering objective (sum of squared distances to the centroids), if known.
        assignments: (n,) int64 cluster of every sample of the split by index (-1: not clustered), or ``None``.
        targets: (n,) int64 labels or (n, C) float32 multi-hot targets of the same samples, or ``None``.
        created: ISO-8601 UTC time of creation.
        extra: Information for logs (settings, timings), plain values that ``torch.load(weights_only=True)`` reads.
    """

    prototypes: torch.Tensor
    prior: torch.Tensor
    key: DictionaryKey
    num_samples: int = 0
    inertia: float | None = None
    assignments: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prototypes = torch.as_tensor(self.prototypes, dtype=torch.float32)
        self.prior = torch.as_tensor(self.prior, dtype=torch.float32)
        if self.assignments is not None:
            self.assignments = torch.as_tensor(self.assignments, dtype=torch.int64).flatten()
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets)
        problem = self._problem()
        if problem:
            raise ValueError(f"Invalid confounder dictionary: {problem}.")

    def _problem(self) -> str | None:
        """What is inconsistent about the fields, or ``None``."""
        z, p = self.prototypes, self.prior
        if not isinstance(self.key, DictionaryKey):
            return f"key must be a DictionaryKey, got {type(self.key).__name__}"
        if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
            return f"prototypes must have shape (N, d) with N, d > 0, got {list(z.shape)}"
        if p.shape != (z.shape[0],):
            return f"prior must have shape ({z.shape[0]},) to match the prototypes, got {list(p.shape)}"
        if self.key.num_prototypes != z.shape[0]:
            return f"the key says num_prototypes={self.key.num_prototypes} but there are {z.shape[0]} prototypes"
        if not torch.isfinite(z).all():
            return "prototypes contain NaN or infinite values"
        if not torch.isfinite(p).all():
            return "prior contains NaN or infinite values"
        if (p < 0).any():
            return f"prior has negative entries (min {p.min().item():.3g})"
        total = p.double().sum().item()
        if abs(total - 1.0) > _PRIOR_TOLERANCE:
            return f"prior sums to {total:.6g}, not 1"
        if self.inertia is not None and not math.isfinite(self.inertia):
            return f"inertia must be finite or None, got {self.inertia!r}"
        if not isinstance(self.created, str):
            return f"created must be a string, got {type(self.created).__name__}"
        if not isinstance(self.extra, dict):
            return f"extra must be a dict, got {type(self.extra).__name__}"
        if self.assignments is not None:
            a = self.assignments
            if a.numel() and (a.min() < -1 or a.max() >= z.shape[0]):
                return f"assignments must be cluster ids in [-1, {z.shape[0]}), got [{a.min()}, {a.max()}]"
            if self.targets is not None and self.targets.shape[0] != a.shape[0]:
                return f"targets have {self.targets.shape[0]} rows but there are {a.shape[0]} assignments"
        return None

    @property
    def dim(self) -> int:
        """Feature size d of the prototypes."""
        return int(self.prototypes.shape[1])

    @property
    def num_prototypes(self) -> int:
        """N."""
        return int(self.prototypes.shape[0])

    @property
    def source(self) -> str:
        """``"features"`` or ``"random"`` (from the key)."""
        return self.key.source

    @classmethod
    def from_clustering(
        cls,
        centroids: torch.Tensor | Any,
        counts: torch.Tensor | Any,
        key: DictionaryKey,
        *,
        num_samples: int | None = None,
        inertia: float | None = None,
        assignments: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ConfounderDictionary:
        """The dictionary of (N, d) centroids and (N,) cluster sizes: z_i = centroid i, P(z_i) = N_i / sum_j N_j.

        ``key.source`` must be ``"features"``; ``num_samples`` defaults to ``counts.sum()``; the other arguments
        are the attributes of the same names.
        """
        if key.source != "features":
            raise ValueError(f"A clustering gives a source='features' dictionary, but the key says {key.source!r}.")
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        if (counts < 0).any() or not torch.isfinite(counts).all():
            raise ValueError(f"Cluster counts must be finite and non-negative, got {counts.tolist()[:10]}...")
        total = counts.sum().item()
        if total <= 0:
            raise ValueError("Cluster counts sum to 0: there were no samples to cluster.")
        return cls(
            torch.as_tensor(centroids, dtype=torch.float32),
            (counts / total).to(torch.float32),
            key,
            num_samples=round(total) if num_samples is None else int(num_samples),
            inertia=None if inertia is None else float(inertia),
            assignments=assignments,
            targets=targets,
            extra=dict(extra or {}),
        )

    @classmethod
    def random(
        cls, num_prototypes: int, dim: int, *, seed: int, scale: float = 1.0, extra: dict[str, Any] | None = None
    ) -> ConfounderDictionary:
        """The paper's "random Z" ablation: i.i.d. N(0, ``scale``^2) prototypes (N, d) with a uniform prior.

        Drawn from a ``torch.Generator`` seeded with ``seed``, the same on every machine and rank; pass the standard
        deviation of real scene features as ``scale`` to match their magnitude. Only N and the seed are in the key.
        """
        if num_prototypes < 1 or dim < 1:
            raise ValueError(f"num_prototypes and dim must be positive, got {num_prototypes} and {dim}.")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}.")
        generator = torch.Generator().manual_seed(int(seed))
        prototypes = torch.randn(num_prototypes, dim, generator=generator, dtype=torch.float32) * scale
        return cls(
            prototypes,
            torch.full((num_prototypes,), 1.0 / num_prototypes, dtype=torch.float32),
            DictionaryKey.for_random(num_prototypes, seed),
            extra={"scale": float(scale), **(extra or {})},
        )

    def mismatches(
        self,
        wanted: DictionaryKey,
        *,
        dim: int | None = None,
        num_samples: int | None = None,
        ignore: Iterable[str] = (),
    ) -> list[str]:
        """Why a run with key ``wanted`` cannot reuse this dictionary, one reason per field; empty if it can.

        ``dim`` and ``num_samples`` are checked when given; ``ignore`` names key fields not compared.
        """
        reasons = self.key.differences(wanted, ignore=ignore)
        for name, want in (("dim", dim), ("num_samples", num_samples)):
            if want is not None and getattr(self, name) != want:
                reasons.append(f"{name}: cache has {getattr(self, name)!r}, run wants {want!r}")
        return reasons

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the dictionary atomically (:func:`~ccim_lightning.checkpoints.atomic_write`); returns the path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_TAG,
            "version": FORMAT_VERSION,
            "prototypes": self.prototypes.detach().to("cpu", torch.float32).contiguous().clone(),
            "prior": self.prior.detach().to("cpu", torch.float32).contiguous().clone(),
            "key": self.key.as_dict(),
            "metadata": {name: getattr(self, name) for name in _METADATA_FIELDS}
            | {"extra": _plain(self.extra, "extra")},
        }
        for name in _OPTIONAL_TENSOR_FIELDS:
            value = getattr(self, name)
            payload[name] = None if value is None else value.detach().cpu().contiguous().clone()
        with atomic_write(path) as f:  # a full disk or a kill keeps the previous file; the error names this one
            torch.save(payload, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConfounderDictionary:
        """Reads a file written by :meth:`save`, checking it thoroughly; tensors on the CPU.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            DictionaryFileError: A damaged, foreign, other-version or inconsistent file.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Confounder dictionary file {str(path)!r} does not exist.")
        where = f"Confounder dictionary file {str(path)!r}"
        remedy = "Delete it and rebuild the dictionary (or point to a file written by ConfounderDictionary.save)."
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure here means the bytes are not a readable torch file
            unsafe = refused_globals(path, exc) if isinstance(exc, pickle.UnpicklingError) else []
            if unsafe:  # intact but unsafe, not damaged: said so, as for checkpoints and weights files
                raise UnsafeDictionaryError(
                    f"Refused {where[0].lower()}{where[1:]}: its pickle needs the Python global(s) "
                    f"{', '.join(unsafe)}, and unpickling a global can run code stored in the file. Dictionary files "
                    f"are read with torch.load(weights_only=True), which refuses to run code from a file; "
                    f"{TRUST_ADVICE}. Build the dictionary yourself (`ccim build-dictionary`) instead."
                ) from exc
            first = (str(exc).strip().splitlines() or ["no message"])[0]
            raise DictionaryFileError(
                f"{where} cannot be read: damaged, truncated or not a torch file ({type(exc).__name__}: {first}). "
                f"{remedy}"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
            found = f"a dict with keys {list(payload)[:10]}" if isinstance(payload, dict) else type(payload).__name__
            raise DictionaryFileError(
                f"{where} is not a confounder dictionary: it holds {found} without the format tag {FORMAT_TAG!r}. "
                f"{remedy}"
            )
        version = payload.get("version")
        if version != FORMAT_VERSION:
            age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "another"
            raise DictionaryFileError(
                f"{where} has format version {version!r}, written by {age} ccim-lightning; this one reads version "
                f"{FORMAT_VERSION}. Rebuild it: delete the file and run again (or `ccim build-dictionary`)."
            )
        return cls._from_payload(payload, where, remedy)

    @classmethod
    def _from_payload(cls, payload: dict, where: str, remedy: str) -> ConfounderDictionary:
        metadata, key = payload.get("metadata"), payload.get("key")
        problem = None
        if not isinstance(metadata, dict) or not isinstance(key, dict):
            problem = "no metadata or key dict"
        elif missing := [k for k in ("prototypes", "prior") if not isinstance(payload.get(k), torch.Tensor)]:
            problem = f"no tensor under {missing}"
        elif unknown := sorted(set(metadata) - set(_METADATA_FIELDS) - {"extra"}):
            problem = f"unknown metadata fields {unknown}"
        elif absent := sorted(set(_METADATA_FIELDS) - set(metadata)):
            problem = f"metadata lacks {absent}"
        elif (payload["prototypes"].dtype, payload["prior"].dtype) != (torch.float32,) * 2:
            problem = f"tensors are {payload['prototypes'].dtype}/{payload['prior'].dtype}, not float32"
        else:
            try:
                optional = {name: payload.get(name) for name in _OPTIONAL_TENSOR_FIELDS}
                return cls(payload["prototypes"], payload["prior"], DictionaryKey(**key), **optional, **metadata)
            except (ValueError, TypeError) as exc:
                problem = str(exc).removeprefix("Invalid confounder dictionary: ").rstrip(".")
        raise DictionaryFileError(f"{where} is inconsistent: {problem}. {remedy}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_prototypes={self.num_prototypes}, dim={self.dim}, source={self.source!r}, "
            f"extractor={self.key.extractor!r}, mask_subject={self.key.mask_subject}, seed={self.key.seed}, "
            f"num_samples={self.num_samples}, created={self.created!r})"
        )


_OPTIONAL_TENSOR_FIELDS = ("assignments", "targets")
_METADATA_FIELDS = ("num_samples", "inertia", "created")


def check_cache_path(path: str | os.PathLike) -> Path:
    """``path`` expanded, once checked writable before a build of hours; deletes stale ``.<name>.<pid>.tmp`` files.

    Raises:
        DictionaryFileError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise DictionaryFileError(
            f"The dictionary cache {str(path)!r} is a folder; give a file path such as {str(path / 'dictionary.pt')!r}."
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DictionaryFileError(f"Cannot create the dictionary cache folder {str(folder)!r}: {error}.") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DictionaryFileError(
            f"The dictionary cache folder {str(folder)!r} is not writable: choose another `cache` path (checked "
            "before building, so no work is lost)."
        )
    remove_stale_temporaries(path)
    return path


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain types ``torch.load(weights_only=True)`` reads (numpy scalars, tuples, tensors converted)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        if odd := [k for k in value if not isinstance(k, (str, int))]:
            raise TypeError(f"{where} has a key of type {type(odd[0]).__name__}; use str keys.")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item(), where)
    raise TypeError(
        f"{where} holds a {type(value).__name__}, which a weights-only torch.load cannot read; store plain values "
        f"(str, int, float, bool, None, lists, dicts, tensors)."
    )


def dataset_fingerprint(identities: Iterable[str | os.PathLike]) -> str:
    """``"n=<count>;sha256=<hex>"`` of one stable name per sample (e.g. image path and box, or ``"train:17"``).

    Order-free (the sorted per-identity hashes are hashed), so any loader order or sharding of a split gives the same
    fingerprint; repeated identities count as often as they occur.
    """
    hashes = []
    for identity in map(lambda i: os.fspath(i) if isinstance(i, os.PathLike) else i, identities):
        if not isinstance(identity, str):
            raise TypeError(f"Sample identities must be strings (e.g. image paths), got {type(identity).__name__}.")
        hashes.append(hashlib.sha256(identity.encode("utf-8")).digest())
    return f"n={len(hashes)};sha256={hashlib.sha256(b''.join(sorted(hashes))).hexdigest()}"
