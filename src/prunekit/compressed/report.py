"""What a compressed file holds: bytes per tensor and per index form (returned by
:func:`prunekit.save_pruned` with ``sparse=True`` and by :func:`prunekit.inspect_file`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorReport:
    """One state-dict entry of a compressed file. Sizes in bytes, after entropy coding."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nonzero: int
    form: str  # "dense", "bitmask", "relative(5)", "rows", "nm(2:4)" or "alias of <name>"
    values: str  # "raw float32" or "shared 5-bit (float32 codebook)"
    position_bytes: int = 0
    value_bytes: int = 0
    codebook_bytes: int = 0
    coders: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def total_bytes(self) -> int:
        return self.position_bytes + self.value_bytes + self.codebook_bytes


@dataclass(frozen=True)
class FileReport:
    """A compressed file: its tensors, the header's size, the whole file's size (bytes)."""

    path: str
    version: int
    codec: str
    file_bytes: int
    header_bytes: int
    has_plan: bool
    tensors: list[TensorReport] = field(default_factory=list)

    def bytes_by_form(self) -> dict[str, int]:
        """Bytes of tensor data per index form (aliases take none)."""
        totals: dict[str, int] = defaultdict(int)
        for tensor in self.tensors:
            totals[tensor.form.split("(")[0]] += tensor.total_bytes
        return dict(totals)

    def to_markdown(self) -> str:
        lines = [
            f"{self.path}: {self.file_bytes:,} bytes (format version {self.version}, {self.codec}; "
            f"header {self.header_bytes:,} bytes{', with a compaction plan' if self.has_plan else ''})",
            "",
            "| tensor | shape | dtype | non-zero | form | values | positions (B) | values (B) | codebook (B) | total (B) |",
            "|---|---|---|---:|---|---|---:|---:|---:|---:|",
        ]
        for t in self.tensors:
            shape = "×".join(map(str, t.shape)) or "scalar"
            lines.append(
                f"| {t.name} | {shape} | {t.dtype} | {t.nonzero:,} | {t.form} | {t.values} | "
                f"{t.position_bytes:,} | {t.value_bytes:,} | {t.codebook_bytes:,} | {t.total_bytes:,} |"
            )
        forms = ", ".join(f"{form} {size:,} B" for form, size in self.bytes_by_form().items())
        return "\n".join([*lines, "", f"By form: {forms}."])

    def __str__(self) -> str:
        return self.to_markdown()
