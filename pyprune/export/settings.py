"""What the rest of pyprune needs from :mod:`pyprune.export` without loading onnx,
onnx_ir and onnxruntime (about a second): the export's settings, its errors, and the
verification record. The modules that export and verify import them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMS = ("dense", "compact")
DEFAULT_OPSET = 18
MIN_OPSET = 17
DEFAULT_ATOL = 1e-4
DEFAULT_IMAGES = 256


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX; the message says why (and names the operator)."""


@dataclass
class Verification:
    """What the comparison found. ``passed`` needs both: every logit within
    ``atol`` of PyTorch's, and the same top-1 class on every image."""

    n: int
    atol: float
    max_abs_diff: float
    top1_mismatches: int
    over_atol_images: int
    mismatched_images: list[int] = field(default_factory=list)  # first few, by index in the batch given
    provider: str = "CPUExecutionProvider"
    onnxruntime: str = ""  # its version, filled in by the verifier
    seconds: float = 0.0
    data: str | None = None  # which images, e.g. "cifar10/val[:256]"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_mismatches == 0

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        where = f" on {self.data}" if self.data else f" on {self.n} images"
        text = (f"onnxruntime {self.onnxruntime} ({self.provider}) vs PyTorch{where}: {verdict}; max |logit diff| "
                f"{self.max_abs_diff:.3g} (limit {self.atol:g}), top-1 differs on {self.top1_mismatches}/{self.n} "
                f"images")
        if not self.passed:
            text += (f", {self.over_atol_images} images have a logit off by more than {self.atol:g}"
                     f"; first mismatching images: {self.mismatched_images}")
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


class VerificationError(RuntimeError):
    """The ONNX model does not reproduce the PyTorch model; ``verification`` has the figures."""

    def __init__(self, verification: Verification, kept: str | None = None) -> None:
        self.verification = verification
        self.kept = kept
        where = f"; the unverified file was kept as {kept}" if kept else ""
        super().__init__(verification.summary() + where)
