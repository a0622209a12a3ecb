"""A synthetic extremity with a sarcoma, defined analytically in patient space (mm).

Tissues are functions of physical coordinates, so every series is rendered on
its own grid (matrix, spacing, slice thickness, patient motion) and its
ground-truth masks on exactly the same grid. Labels:

====  ================  ====  ====================
0     air               6     vessel
1     skin              7     tumour, viable
2     subcutaneous fat  8     tumour, necrotic core
3     muscle            9     tumour, haemorrhage
4     cortical bone     10    peritumoral edema
5     marrow
====  ================  ====  ====================

The latent tumour traits (:class:`Traits`) drive shape and content: size,
margin irregularity (radial harmonics), heterogeneity (texture amplitude),
necrosis fraction (core threshold) and edema extent (halo width); the cohort's
survival model is written over the same traits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR, SKIN, FAT, MUSCLE, CORTEX, MARROW, VESSEL = 0, 1, 2, 3, 4, 5, 6
VIABLE, NECROSIS, HAEMORRHAGE, EDEMA = 7, 8, 9, 10
TUMOUR_LABELS = (VIABLE, NECROSIS, HAEMORRHAGE)


@dataclass(frozen=True)
class Traits:
    """Latent tumour traits (the truth behind image features and outcome)."""

    radius_mm: float  # equivalent radius of the tumour
    irregularity: float  # 0 (smooth) .. 1 (lobulated, infiltrative margin)
    heterogeneity: float  # 0 .. 1: amplitude of internal texture
    necrosis: float  # 0 .. 0.6: fraction of the tumour that is necrotic core
    edema_mm: float  # 0 .. 25: width of the peritumoral edema halo

    @property
    def volume_ml(self) -> float:
        """Nominal tumour volume (sphere of ``radius_mm``)."""
        return 4.0 / 3.0 * np.pi * self.radius_mm**3 / 1000.0


def draw_traits(rng: np.random.Generator) -> Traits:
    """Draw latent traits with plausible ranges for extremity soft-tissue sarcoma."""
    return Traits(
        radius_mm=float(np.clip(rng.lognormal(np.log(22), 0.35), 10, 45)),
        irregularity=float(rng.beta(2, 3)),
        heterogeneity=float(rng.beta(2, 2)),
        necrosis=float(np.clip(rng.beta(2, 4) * 0.7, 0.0, 0.6)),
        edema_mm=float(np.clip(rng.gamma(2.0, 4.0), 0, 25)),
    )


class _Waves:
    """A smooth random field: a sum of sinusoids in 3-D (deterministic per rng)."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength_mm: float) -> None:
        self.k = rng.normal(size=(n, 3)) * (2 * np.pi / wavelength_mm)
        self.phase = rng.uniform(0, 2 * np.pi, n)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y, z).shape, np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(kx * x + ky * y + kz * z + ph).astype(np.float32)
        scaled: np.ndarray = out / np.sqrt(len(self.phase) / 2)
        return scaled


@dataclass
class Limb:
    """One synthetic thigh/arm with its tumour; call :meth:`labels` on coordinates."""

    traits: Traits
    rng: np.random.Generator

    def __post_init__(self) -> None:
        r = self.rng
        self.outer = (r.uniform(65, 85), r.uniform(55, 75))  # limb semi-axes (x, y)
        self.fat_mm = r.uniform(6, 16)
        self.bone_c = (r.uniform(-8, 8), r.uniform(-5, 10))
        self.bone_r = r.uniform(11, 15)
        self.vessels = [
            (
                self.bone_c[0] + r.uniform(-25, 25),
                self.bone_c[1] - r.uniform(18, 28),
                r.uniform(2, 4),
            )
            for _ in range(3)
        ]
        angle = r.uniform(0, 2 * np.pi)  # tumour sits in the muscle, off the bone
        dist = self.bone_r + self.traits.radius_mm * 0.8 + r.uniform(4, 12)
        cx = self.bone_c[0] + dist * np.cos(angle)
        cy = self.bone_c[1] + dist * np.sin(angle)
        scale = (
            0.8 * (min(self.outer) - self.fat_mm - self.traits.radius_mm) / max(np.hypot(cx, cy), 1)
        )
        if scale < 1:
            cx, cy = cx * scale, cy * scale
        self.centre = np.array([cx, cy, r.uniform(-10, 10)])
        self.axes = np.array([1.0, r.uniform(0.75, 1.0), r.uniform(1.1, 1.6)])  # elongated in z
        n = 6
        self.harm_l = r.integers(2, 6, size=n)
        self.harm_phase = r.uniform(0, 2 * np.pi, size=(n, 2))
        self.harm_amp = r.uniform(0.4, 1.0, size=n) / n
        self.texture = _Waves(r, 12, 14.0)
        self.core = _Waves(r, 8, 30.0)
        self.bleed = _Waves(r, 8, 9.0)
        self.edema_shape = _Waves(r, 8, 25.0)
        self.fascia = [r.uniform(0, np.pi) for _ in range(3)]

    def _tumour_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed normalised radius: < 1 inside the (lobulated) tumour surface."""
        t = self.traits
        dx = (x - self.centre[0]) / (t.radius_mm * self.axes[0])
        dy = (y - self.centre[1]) / (t.radius_mm * self.axes[1])
        dz = (z - self.centre[2]) / (t.radius_mm * self.axes[2])
        rho = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        theta, phi = np.arccos(np.clip(dz / rho, -1, 1)), np.arctan2(dy, dx)
        bumps = np.zeros_like(rho)
        for order, (p1, p2), a in zip(self.harm_l, self.harm_phase, self.harm_amp, strict=True):
            bumps += a * np.cos(order * phi + p1) * np.sin(order * theta + p2)
        normalised: np.ndarray = rho / (1.0 + (0.08 + 0.45 * t.irregularity) * bumps)
        return normalised

    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Tissue label at each point (arrays of equal shape, mm, patient LPS)."""
        ax, ay = self.outer
        e = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
        out = np.full(x.shape, AIR, np.uint8)
        out[e < 1.0] = SKIN
        out[e < 1.0 - 2.0 / min(ax, ay)] = FAT
        muscle = e < 1.0 - (2.0 + self.fat_mm) / min(ax, ay)
        out[muscle] = MUSCLE
        for a in self.fascia:  # intermuscular fat planes
            d = np.abs((x - self.bone_c[0]) * np.sin(a) - (y - self.bone_c[1]) * np.cos(a))
            out[muscle & (d < 0.8) & (e > 0.35)] = FAT
        rb = np.hypot(x - self.bone_c[0], y - self.bone_c[1])
        out[rb < self.bone_r] = CORTEX
        out[rb < self.bone_r - 3.5] = MARROW
        for vx, vy, vr in self.vessels:
            out[(np.hypot(x - vx, y - vy) < vr) & muscle] = VESSEL
        t = self.traits
        reach = t.radius_mm * self.axes * (1.0 + 0.6 * t.irregularity + 0.2) + 1.5 * t.edema_mm + 3
        near = (
            (np.abs(x - self.centre[0]) < reach[0])
            & (np.abs(y - self.centre[1]) < reach[1])
            & (np.abs(z - self.centre[2]) < reach[2])
        )
        if near.any():  # tumour fields are costly: evaluate them in its bounding box only
            out[near] = self._tumour_labels(out[near], x[near], y[near], z[near])
        return out

    def _tumour_labels(
        self, out: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> np.ndarray:
        t = self.traits
        dist = self._tumour_distance(x, y, z)
        soft = (out == MUSCLE) | (out == FAT) | (out == VESSEL)
        if t.edema_mm > 0.5:
            halo = 1.0 + (t.edema_mm * (1 + 0.35 * self.edema_shape(x, y, z))) / t.radius_mm
            out[soft & (dist < halo)] = EDEMA
        inside = (dist < 1.0) & np.isin(out, (MUSCLE, FAT, VESSEL, EDEMA))
        out[inside] = VIABLE
        if t.necrosis > 0.02:
            core_level = np.cbrt(t.necrosis) * (1.0 + 0.25 * self.core(x, y, z))
            out[inside & (dist < core_level)] = NECROSIS
        out[inside & (self.bleed(x, y, z) > 2.1 - 0.6 * t.heterogeneity)] = HAEMORRHAGE
        return out

    def texture_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Multiplicative internal texture of the tumour (1 ± heterogeneity)."""
        field: np.ndarray = 1.0 + 0.35 * self.traits.heterogeneity * np.tanh(self.texture(x, y, z))
        return field
