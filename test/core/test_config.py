"""Config values read from YAML and ``--set`` overrides: typed per field, refused with the field and the value."""
import pytest

from ov3d_ros.core.config import MapperConfig, parse_overrides, update_from_dict, validate


def _set(*items) -> MapperConfig:
    return update_from_dict(MapperConfig(), parse_overrides(items))


def test_a_single_text_for_a_list_field_is_a_list_of_one():
    cfg = _set('labels.vocabulary=chair', 'query.default_negatives=wall', 'query.templates=a photo of a {}.')
    assert cfg.labels.vocabulary == ['chair']
    assert cfg.query.default_negatives == ['wall']
    assert cfg.query.templates == ['a photo of a {}.']
    assert _set('labels.vocabulary=[chair, sofa]').labels.vocabulary == ['chair', 'sofa']
    assert _set('labels.vocabulary=[]').labels.vocabulary == []


@pytest.mark.parametrize('item, message', [
    ('labels.vocabulary=5', r'^labels.vocabulary must be a list of strings .*got 5$'),
    ('labels.vocabulary=', r'^labels.vocabulary must be a list of strings .*got None$'),
    ('labels.vocabulary=[1, 2]', r'^labels.vocabulary must be a list of strings, got \[1, 2\] \(1 is not a string\)$'),
    ('query.default_negatives={a: 1}', r'^query.default_negatives must be a list of strings'),
])
def test_list_fields_refuse_what_is_not_a_list_of_texts(item, message):
    with pytest.raises(ValueError, match=message):
        _set(item)


def test_validate_refuses_a_bare_string_for_a_list_field():
    """The Python API sets fields directly: a string would be read as its characters."""
    cfg = MapperConfig()
    cfg.labels.vocabulary = 'chair'
    with pytest.raises(ValueError, match=r"^labels.vocabulary must be a list of strings, got 'chair'$"):
        validate(cfg)
