"""The per-slide figure of predict_cells.py, drawn with PIL: every cell a dot at its position coloured by its
predicted class, a legend with the class names and counts, and, when true labels are known, the confusion matrix
and the accuracy beside the map.

    image = cell_map_figure(x, y, predicted, class_names, extent=(height, width), title="slide 1",
                            true_labels=labels)   # PIL.Image (RGB)
"""
import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10, then evenly spaced hues for more classes
TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MAP_SIDE = 720  # the map's longer side in pixels
MARGIN, LINE = 16, 18
BACKGROUND, INK, FRAME = (255, 255, 255), (20, 20, 20), (200, 200, 200)
CELL_SIDE = 34  # one confusion-matrix cell


def class_colours(count: int) -> list:
    if count <= len(TAB10):
        return list(TAB10[:count])
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / count, 0.75, 0.85)) for i in range(count)]


def font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw, text: str, typeface) -> tuple:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=typeface)
    return right - left, bottom - top


def confusion_matrix(true_labels, predicted, class_names) -> tuple:
    """(rows, counts [R, K] int): rows are the true label names that occur (the model's classes first, in their
    order, then any others sorted), columns the model's classes; unlabelled cells ('' or None) are left out."""
    true_labels = np.asarray(["" if t is None else str(t) for t in true_labels])
    labelled = true_labels != ""
    present = set(true_labels[labelled].tolist())
    rows = [name for name in class_names if name in present] + sorted(present - set(class_names))
    counts = np.zeros((len(rows), len(class_names)), dtype=np.int64)
    row_of, column_of = {name: i for i, name in enumerate(rows)}, {name: j for j, name in enumerate(class_names)}
    for truth, guess in zip(true_labels[labelled].tolist(), np.asarray(predicted)[labelled].tolist()):
        counts[row_of[truth], column_of[guess]] += 1
    return rows, counts


def accuracy_of(true_labels, predicted) -> tuple:
    """(correct, labelled) over the cells with a true label."""
    true_labels = np.asarray(["" if t is None else str(t) for t in true_labels])
    labelled = true_labels != ""
    return int((true_labels[labelled] == np.asarray(predicted)[labelled]).sum()), int(labelled.sum())


def comparable(true_labels, class_names) -> bool:
    """Whether any true label is one of the model's classes (otherwise an accuracy means nothing)."""
    return bool({str(t) for t in true_labels if t} & set(class_names))


def draw_map(x, y, predicted, class_names, extent) -> Image.Image:
    """The dots alone: the slide's (height, width) scaled so that its longer side is MAP_SIDE pixels."""
    height, width = extent
    scale = MAP_SIDE / max(height, width, 1)
    image = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), BACKGROUND)
    draw = ImageDraw.Draw(image)
    spacing = np.sqrt(height * width / max(len(x), 1)) * scale  # typical distance between neighbouring cells
    radius = float(np.clip(0.3 * spacing, 1.0, 6.0))
    colours = dict(zip(class_names, class_colours(len(class_names))))
    for cx, cy, name in zip(np.asarray(x) * scale, np.asarray(y) * scale, predicted):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colours[name])
    draw.rectangle((0, 0, image.width - 1, image.height - 1), outline=FRAME)
    return image


def draw_legend(draw, origin, predicted, class_names, typeface) -> int:
    """Class swatches with names and counts, one per line, from `origin`; returns the y below them."""
    left, top = origin
    counts = {name: 0 for name in class_names}
    for name in predicted:
        counts[name] += 1
    for name, colour in zip(class_names, class_colours(len(class_names))):
        draw.rectangle((left, top + 3, left + 11, top + 14), fill=colour)
        draw.text((left + 18, top), f"{name}: {counts[name]}", fill=INK, font=typeface)
        top += LINE
    return top


def vertical_label(text: str, typeface, height: int) -> Image.Image:
    """`text` rotated to read bottom-up, in an image `height` pixels high (cut to fit)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while text and text_size(probe, text, typeface)[0] > height:
        text = text[:-1]
    strip = Image.new("RGB", (height, LINE), BACKGROUND)
    ImageDraw.Draw(strip).text((0, 0), text, fill=INK, font=typeface)
    return strip.rotate(90, expand=True)


def draw_confusion(true_labels, predicted, class_names, typeface, header: list) -> Image.Image:
    """`header` lines, then the matrix: rows true labels, columns predicted classes; each cell's count, shaded by its
    share of the row."""
    rows, counts = confusion_matrix(true_labels, predicted, class_names)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_label_width = max([text_size(probe, name, typeface)[0] for name in rows] + [40]) + 8
    column_label_height = min(max(text_size(probe, name, typeface)[0] for name in class_names), 120) + 4
    width = max([row_label_width + CELL_SIDE * len(class_names)] +
                [text_size(probe, line, typeface)[0] for line in header]) + MARGIN
    height = (len(header) + 2) * LINE + column_label_height + CELL_SIDE * len(rows) + 2 * LINE
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(header):
        draw.text((0, i * LINE), line, fill=INK, font=typeface)
    top = len(header) * LINE + 8
    draw.text((row_label_width, top), "predicted", fill=INK, font=typeface)
    top += LINE + 2
    for j, name in enumerate(class_names):
        image.paste(vertical_label(name, typeface, column_label_height), (row_label_width + j * CELL_SIDE + 8, top))
    top += column_label_height + 4
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for i, name in enumerate(rows):
        y = top + i * CELL_SIDE
        draw.text((0, y + CELL_SIDE // 2 - 7), name, fill=INK, font=typeface)
        for j in range(len(class_names)):
            x = row_label_width + j * CELL_SIDE
            shade = int(255 - 200 * shares[i, j])
            draw.rectangle((x, y, x + CELL_SIDE - 1, y + CELL_SIDE - 1), fill=(shade, shade, 255), outline=FRAME)
            label = str(counts[i, j])
            w, _ = text_size(draw, label, typeface)
            draw.text((x + (CELL_SIDE - w) // 2, y + CELL_SIDE // 2 - 7), label,
                      fill=INK if shares[i, j] < 0.6 else BACKGROUND, font=typeface)
    draw.text((0, top + len(rows) * CELL_SIDE + 6), "rows: true label", fill=INK, font=typeface)
    return image


def accuracy_line(what: str, true_labels, predicted) -> str:
    correct, labelled = accuracy_of(true_labels, predicted)
    return f"{what}: accuracy {100.0 * correct / max(labelled, 1):.1f}% ({correct} of {labelled} labelled cells)"


def cell_map_figure(x, y, predicted, class_names, extent, title: str, true_labels=None, subsets=None) -> Image.Image:
    """The whole figure: title, map, legend, and (with true labels among the model's classes) the confusion matrix
    with the accuracy over the labelled cells, and over each of `subsets` ({name: bool mask}, e.g. the splits)."""
    typeface = font(13)
    panel = draw_map(x, y, predicted, class_names, extent)
    confusion = None
    notes = []
    if true_labels is not None:
        _, labelled = accuracy_of(true_labels, predicted)
        if labelled and comparable(true_labels, class_names):
            header = [accuracy_line("all cells", true_labels, predicted)]
            for name, mask in (subsets or {}).items():
                chosen = np.flatnonzero(mask)
                header.append(accuracy_line(f"{name} cells", np.asarray(true_labels)[chosen],
                                            np.asarray(predicted)[chosen]))
            confusion = draw_confusion(true_labels, predicted, class_names, typeface, header)
        elif labelled:
            notes.append("true labels are not the model's class names: no confusion matrix")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_height = LINE * (len(class_names) + len(notes)) + MARGIN
    side_width = max([180, confusion.width if confusion else 0] + [text_size(probe, n, typeface)[0] for n in notes])
    width = MARGIN * 3 + panel.width + side_width
    height = MARGIN * 2 + 2 * LINE + max(panel.height, (confusion.height if confusion else 0) + legend_height)
    width = max(width, text_size(probe, title, typeface)[0] + 2 * MARGIN)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font(15))
    top = MARGIN + 2 * LINE
    figure.paste(panel, (MARGIN, top))
    side = MARGIN * 2 + panel.width
    below = draw_legend(draw, (side, top), predicted, class_names, typeface)
    for note in notes:
        draw.text((side, below), note, fill=INK, font=typeface)
        below += LINE
    if confusion is not None:
        figure.paste(confusion, (side, below + MARGIN))
    return figure
