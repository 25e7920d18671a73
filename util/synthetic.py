"""The built-in synthetic data set: multiplexed-immunofluorescence-like brain cells, drawn on the fly.

Seven marker channels and five cell types told apart by markers and shape, so that every script runs on a fresh
machine with no data (the quick start, the tests).
"""
import math
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from util.errors import DataError

CELL_TYPES = ("neuron", "astrocyte", "oligodendrocyte", "microglia", "endothelial")
# The 7 channels of the brain-cell panel the method was built for (Maric et al. 2021)
MARKERS = ("DAPI", "histones", "NeuN", "S100", "Olig2", "Iba1", "RECA1")
DAPI, HISTONES, NEUN, S100, OLIG2, IBA1, RECA1 = range(len(MARKERS))


class Canvas:
    """Pixel grid and 7-marker accumulator [7, S, S] for drawing soft cell parts (float32 numpy)."""

    def __init__(self, size: int):
        self.size = size
        coords = np.arange(size, dtype=np.float32)
        self.y = coords[:, None]  # [S, 1]
        self.x = coords[None, :]  # [1, S]
        self.markers = np.zeros((len(MARKERS), size, size), np.float32)

    def ellipse(self, centre, semi_axes, angle: float, edge: float = 1.0) -> np.ndarray:
        """Soft-edged filled ellipse [S, S] in [0, 1]; `edge` is the edge width in pixels."""
        cos, sin = math.cos(angle), math.sin(angle)
        dy, dx = self.y - centre[0], self.x - centre[1]
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos  # coordinates in the ellipse's frame
        a, b = max(semi_axes[0], 0.5), max(semi_axes[1], 0.5)
        radius = np.sqrt((along / a) ** 2 + (across / b) ** 2)  # 1 on the outline
        return _sigmoid((1.0 - radius) * min(a, b) / edge)

    def segments(self, start, end, width_start, width_end) -> np.ndarray:
        """Soft tapered line segments (K of them, arrays [K, 2] and [K]) -> [S, S] max over segments."""
        start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
        py, px = start[:, 0, None, None], start[:, 1, None, None]  # [K, 1, 1]
        vy, vx = (end - start)[:, 0, None, None], (end - start)[:, 1, None, None]
        length2 = np.maximum(vy * vy + vx * vx, 1e-6)
        t = np.clip(((self.y - py) * vy + (self.x - px) * vx) / length2, 0.0, 1.0)  # [K, S, S] position along
        dist2 = (self.y - py - t * vy) ** 2 + (self.x - px - t * vx) ** 2
        width = np.asarray(width_start, np.float32)[:, None, None] * (1 - t) \
            + np.asarray(width_end, np.float32)[:, None, None] * t
        return np.exp(-dist2 / np.maximum(width, 0.3) ** 2).max(axis=0)

    def paint(self, mask: np.ndarray, levels: dict) -> None:
        """Add `mask` [S, S] to each marker channel at its level ({marker index: intensity})."""
        for marker, level in levels.items():
            self.markers[marker] += np.float32(level) * mask


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _unit(angles) -> np.ndarray:
    """Unit vectors [K, 2] as (dy, dx) for angles [K] in radians."""
    angles = np.asarray(angles)
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1)


def _rays(rng, centre, count: int, inner: float, lengths, spread: float = 0.0):
    """Start/end points [count, 2] of rays from `inner` to `inner + lengths` around `centre`, evenly spread
    with jitter; `spread` bends each ray away from the radial direction (processes are not straight)."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(count) * 2 * np.pi / count + rng.normal(0, 0.3, count)
    start = np.asarray(centre) + inner * _unit(angles)
    end = start + np.asarray(lengths)[:, None] * _unit(angles + rng.normal(0, spread, count))
    return start, end


def _nucleus(canvas: Canvas, rng, centre, semi_axes, angle: float, extra: dict = None) -> np.ndarray:
    """Every cell's nucleus: DAPI and histones (all types), plus any nuclear marker in `extra`."""
    mask = canvas.ellipse(centre, semi_axes, angle)
    levels = {DAPI: rng.uniform(0.35, 0.9), HISTONES: rng.uniform(0.1, 0.5)}
    levels.update(extra or {})
    canvas.paint(mask, levels)
    return mask


def draw_neuron(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Large round soma with a big pale nucleus, one thick apical dendrite; NeuN in nucleus and soma."""
    soma = canvas.ellipse(centre, (radius * 0.8, radius * rng.uniform(0.6, 0.8)), angle, edge=1.5)
    tip = np.asarray(centre) + radius * rng.uniform(1.2, 1.6) * _unit(angle)
    dendrite = canvas.segments([centre], [tip], [radius * 0.35], [radius * 0.08])
    canvas.paint(np.maximum(soma, dendrite), {NEUN: 0.5 * marker, S100: rng.uniform(0, 0.1)})
    pale_nucleus = {NEUN: 0.6 * marker, DAPI: rng.uniform(0.2, 0.5)}  # neuronal chromatin is loosely packed
    _nucleus(canvas, rng, centre, (radius * 0.45, radius * 0.4), angle, pale_nucleus)


def draw_astrocyte(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small soma with 4-6 thick, tapering, straight processes (star shape); S100, some Olig2."""
    count = int(rng.integers(4, 7))
    start, end = _rays(rng, centre, count, radius * 0.2, radius * rng.uniform(0.7, 1.1, count), spread=0.15)
    processes = canvas.segments(start, end, np.full(count, radius * 0.22), np.full(count, radius * 0.06))
    soma = canvas.ellipse(centre, (radius * 0.4, radius * 0.35), angle, edge=1.0)
    canvas.paint(np.maximum(soma, processes), {S100: marker})
    olig2 = rng.uniform(0.0, 0.35) if rng.random() < 0.4 else 0.0  # Olig2 is also found in some astrocytes
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.25), angle, {OLIG2: olig2})


def draw_oligodendrocyte(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small, round, dense nucleus with Olig2, a thin rim of cytoplasm (faint S100), 0-3 faint processes."""
    rim = canvas.ellipse(centre, (radius * 0.45, radius * 0.4), angle, edge=1.0)
    count = int(rng.integers(0, 4))
    if count:
        start, end = _rays(rng, centre, count, radius * 0.3, radius * rng.uniform(0.5, 0.9, count), spread=0.3)
        rim = np.maximum(rim, 0.5 * canvas.segments(start, end, np.full(count, 1.0), np.full(count, 0.6)))
    canvas.paint(rim, {S100: rng.uniform(0.05, 0.4)})
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.28), angle, {OLIG2: marker, DAPI: rng.uniform(0.6, 1.0)})


def draw_microglia(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small elongated nucleus, tiny soma, 4-6 thin long bent processes each with a side branch; Iba1."""
    count = int(rng.integers(4, 7))
    start, end = _rays(rng, centre, count, radius * 0.15, radius * rng.uniform(0.8, 1.3, count), spread=0.4)
    fork = start + (end - start) * rng.uniform(0.4, 0.7, (count, 1))  # branch points along each process
    heading = np.arctan2((end - start)[:, 0], (end - start)[:, 1])
    turn = heading + rng.choice([-1, 1], count) * rng.uniform(0.5, 1.0, count)  # branches leave at 30-60 degrees
    branch_end = fork + radius * rng.uniform(0.3, 0.6, (count, 1)) * _unit(turn)
    processes = canvas.segments(np.concatenate([start, fork]), np.concatenate([end, branch_end]),
                                np.full(2 * count, 1.3), np.full(2 * count, 0.6))
    soma = canvas.ellipse(centre, (radius * 0.3, radius * 0.22), angle, edge=1.0)
    canvas.paint(np.maximum(soma, processes), {IBA1: marker})
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.15), angle)


def draw_endothelial(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Thin, very elongated nucleus lying along a vessel wall (RECA1 band crossing the whole image)."""
    direction = _unit(angle)
    offset = np.array([-direction[1], direction[0]]) * radius * rng.uniform(-0.15, 0.15)  # nucleus sits in the wall
    far = canvas.size * direction
    vessel = canvas.segments([np.array(centre) + offset - far], [np.array(centre) + offset + far],
                             [radius * rng.uniform(0.2, 0.35)], [radius * rng.uniform(0.2, 0.35)])
    canvas.paint(vessel, {RECA1: marker, IBA1: rng.uniform(0.0, 0.15)})  # perivascular Iba1 stays faint
    _nucleus(canvas, rng, centre, (radius * 0.6, radius * 0.17), angle)


CELL_DRAWERS = (draw_neuron, draw_astrocyte, draw_oligodendrocyte, draw_microglia, draw_endothelial)


class SyntheticCells(Dataset):
    """Multiplexed-immunofluorescence-like brain cells, generated on the fly and deterministic per index.

    Seven channels (MARKERS: DAPI, histones, NeuN, S100, Olig2, Iba1, RECA1) and five cell types
    (CELL_TYPES) told apart by which markers light up *and* by shape: round neurons with a dendrite,
    star-shaped astrocytes, small round oligodendrocytes, thin branched microglia, elongated endothelial
    cells on a vessel. All share the nuclear DAPI/histone channels; markers overlap between some types
    (Olig2 in astrocytes, S100 in oligodendrocytes, Iba1 near vessels); intensity, size, orientation and
    position vary; 0-2 partial neighbours of random types, background and shot/read noise are added.
    A tenth of the cells have a dim marker, so channel means alone cannot label every cell.

    The image is S0 x S0 with S0 = img_size and the cell near the centre with radius S0/5..S0/3, so the
    reference's random S/2 crop usually shows part of it. With in_chans != 7 marker m goes to channel
    m % in_chans (only 7 is meaningful). Labels are balanced: label = index % num_classes.
    `split` ('train', 'val', ...) enters the seed, so splits with the same seed never share images.

    __getitem__ -> (image [in_chans, S0, S0] float32 in [0, 1], or transform(image); label int).
    """

    def __init__(self, num_samples: int, img_size: int, in_chans: int = 7, num_classes: int = 5, seed: int = 0,
                 split: str = "train", transform=None):
        if not 1 <= num_classes <= len(CELL_TYPES):
            raise DataError(f"synthetic dataset: {num_classes} classes requested; expected 1 to {len(CELL_TYPES)}")
        if in_chans < 1 or img_size < 8 or num_samples < 1:
            raise DataError(f"synthetic dataset: needs --in_chans >= 1, --img_size >= 8 and at least one sample; "
                            f"got in_chans={in_chans}, img_size={img_size}, num_samples={num_samples}")
        self.num_samples, self.img_size, self.in_chans = num_samples, img_size, in_chans
        self.num_classes, self.seed, self.transform = num_classes, seed, transform
        self.split_key = zlib.crc32(split.encode())  # stable across runs, unlike hash(str)
        self.classes = list(CELL_TYPES[:num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.render(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.label(index)

    def label(self, index: int) -> int:
        return index % self.num_classes

    def render(self, index: int) -> np.ndarray:
        """The image of sample `index`: float32 [in_chans, S0, S0] in [0, 1]."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic dataset index {index} out of range 0..{self.num_samples - 1}")
        rng = np.random.default_rng([self.seed, self.split_key, index])  # independent stream per sample
        size = self.img_size
        canvas = Canvas(size)
        self._draw_neighbours(canvas, rng)
        centre = (size - 1) / 2 + rng.normal(0, 0.05 * size, 2)
        self._draw_cell(canvas, rng, self.label(index), centre, rng.uniform(size / 5, size / 3))
        return self._finish(canvas.markers, rng)

    def _draw_cell(self, canvas: Canvas, rng, cell_type: int, centre, radius: float) -> None:
        marker = rng.uniform(0.3, 1.0) if rng.random() > 0.1 else rng.uniform(0.02, 0.15)  # some cells stain dimly
        CELL_DRAWERS[cell_type](canvas, rng, centre, radius, rng.uniform(0, 2 * np.pi), marker)

    def _draw_neighbours(self, canvas: Canvas, rng) -> None:
        """0-2 cells of any type centred near the border, so only part of each is in view."""
        size = self.img_size
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.uniform(0, 2 * np.pi)
            distance = rng.uniform(0.45, 0.7) * size
            centre = (size - 1) / 2 + distance * _unit(direction)
            self._draw_cell(canvas, rng, int(rng.integers(len(CELL_TYPES))), centre, rng.uniform(size / 6, size / 4))

    def _finish(self, markers: np.ndarray, rng) -> np.ndarray:
        """Markers [7, S, S] -> image [in_chans, S, S]: channel mapping, background, noise, clip to [0, 1]."""
        channels = np.zeros((self.in_chans,) + markers.shape[1:], np.float32)
        for marker in range(len(MARKERS)):
            channels[marker % self.in_chans] += markers[marker]
        channels *= np.float32(rng.uniform(0.6, 1.0))  # exposure varies between images
        background = rng.uniform(0.01, 0.08, (self.in_chans, 1, 1)).astype(np.float32)
        signal = np.clip(channels + background, 0.0, 1.0)
        photons = np.float32(rng.uniform(100, 400))  # shot noise: variance proportional to the signal
        read_noise = np.float32(rng.uniform(0.005, 0.03))
        noise = rng.standard_normal(signal.shape, np.float32) * (np.sqrt(signal / photons) + read_noise)
        return np.clip(signal + noise, 0.0, 1.0)
