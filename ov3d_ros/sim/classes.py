"""Semantic classes of the built-in scenes (index = semantic id; 0 = unlabeled / no surface)."""

CLASS_NAMES = (
    'unlabeled', 'wall', 'floor', 'ceiling', 'chair', 'table', 'sofa', 'bed', 'cabinet', 'plant', 'lamp',
    'bookshelf', 'door', 'window', 'picture', 'desk', 'counter', 'curtain', 'refrigerator', 'toilet', 'sink',
    'bathtub',
)


def class_id(name: str) -> int:
    """Semantic id of a class name (ValueError for unknown names)."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f'unknown class {name!r}; known: {", ".join(CLASS_NAMES[1:])}') from None
