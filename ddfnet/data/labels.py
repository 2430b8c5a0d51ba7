"""Scoring one split with a model trained on another: labels are matched by class name.

A folder split's labels are the indices of its own sorted class folders, so a val split that lacks a class
(or holds one the training split did not) numbers the others differently from the model: scored as they
are, the figures are silently wrong. :func:`match_labels` re-numbers a split's targets into the model's
class list (the checkpoint's ``class_names``, or the training split's names in ``train.py``).
"""
from __future__ import annotations

from typing import Sequence

from ..cli import UserError
from .datasets import class_names


class LabelMap:
    """``target_transform`` that turns a split's label into the model's: ``table[label]`` (picklable, so
    data loader workers get it)."""

    def __init__(self, table: Sequence[int], inner=None):
        self.table, self.inner = list(table), inner

    def __call__(self, target):
        target = self.inner(target) if self.inner is not None else target
        return target if target < 0 else self.table[int(target)]  # negative: no label (an unreadable image)


def label_table(split_classes: Sequence[str], model_classes: Sequence[str], where: str) -> list[int]:
    """For each of ``split_classes`` (in the split's label order) its index in ``model_classes``; a class
    the model does not know raises :class:`UserError` naming it."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in split_classes if name not in index]
    if unknown:
        shown = ', '.join(unknown[:5]) + (f' and {len(unknown) - 5} more' if len(unknown) > 5 else '')
        raise UserError(f'{where} holds {len(unknown)} class(es) the model was not trained on: {shown} '
                        f'(its {len(model_classes)} classes: {", ".join(list(model_classes)[:8])}'
                        f'{", ..." if len(model_classes) > 8 else ""}); remove them or score another split')
    return [index[name] for name in split_classes]


def missing_note(split_classes: Sequence[str], model_classes: Sequence[str], where: str) -> str | None:
    """One line saying which of the model's classes ``where`` lacks (None: it holds them all)."""
    missing = [name for name in model_classes if name not in set(split_classes)]
    if not missing:
        return None
    shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
    return (f'{where} has no images of {len(missing)} of the model\'s {len(model_classes)} classes ({shown}): '
            f'scored on the {len(model_classes) - len(missing)} it holds, labels matched by class name')


def match_labels(dataset, model_classes: Sequence[str] | None, where: str) -> str | None:
    """Make ``dataset``'s targets indices into ``model_classes`` (matched by name); returns a line to say
    once, or None when there is nothing to say.

    ``model_classes`` None (a checkpoint without class names: the original release's, timm's) keeps the
    split's own label order, and says so; so does a split that does not tell its class names. A split
    class the model does not know raises :class:`UserError` before any image is read.
    """
    split_classes = class_names(dataset)
    if model_classes is None:
        return (f'the model has no class names: {where} is scored with its own label order '
                '(correct only if it holds exactly the classes the model was trained on, in the same order)')
    if split_classes is None:
        return (f'{where} does not list its class names: scored with its own label order, not matched to the '
                'model\'s class names')
    table = label_table(split_classes, model_classes, where)
    if table != list(range(len(table))):  # identical numbering needs no transform
        dataset.target_transform = LabelMap(table, getattr(dataset, 'target_transform', None))
    return missing_note(split_classes, model_classes, where)


def read_class_map(path: str) -> list[str]:
    """Class names from a text file, one a line in label order (blank lines ignored)."""
    try:
        with open(path, encoding='utf-8') as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'cannot read --class-map {path}: {e}') from None
    if not names:
        raise UserError(f'--class-map {path} holds no class names')
    return names
