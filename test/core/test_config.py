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


def test_scientific_notation_is_a_number():
    """YAML 1.1 (PyYAML) reads 1e-1 as a string; number fields take it, int fields where it is whole."""
    cfg = _set('map.voxel_size_m=1e-1', 'keyframes.max_interval_s=2E0', 'map.initial_capacity=1e3')
    assert cfg.map.voxel_size_m == 0.1 and cfg.keyframes.max_interval_s == 2.0
    assert cfg.map.initial_capacity == 1000 and type(cfg.map.initial_capacity) is int
    with pytest.raises(ValueError, match=r"^map.pixel_stride must be int, got '2.5e0' \(2.5 is not a whole number\)$"):
        _set('map.pixel_stride=2.5e0')
    assert _set('features.model=1e3').features.model == '1e3'          # a text field keeps its text
    with pytest.raises(ValueError, match=r"^map.voxel_size_m must be float, got 'e-1'$"):
        _set('map.voxel_size_m=e-1')


@pytest.mark.parametrize('values', [{'map': 5}, {'map': [{'voxel_size_m': 0.05}]}, {'purify': 'on'}])
def test_a_section_that_is_not_a_mapping_is_refused_with_its_name(values):
    section = next(iter(values))
    with pytest.raises(ValueError, match=rf"^config section '{section}' must be a mapping of its keys"):
        update_from_dict(MapperConfig(), values)


def test_a_ros_parameter_file_with_no_parameters_is_an_empty_config(tmp_path):
    from ov3d_ros.core.config import load_yaml_config
    (tmp_path / 'empty.yaml').write_text('ov3d_mapping:\n  ros__parameters:\n')
    assert load_yaml_config([tmp_path / 'empty.yaml']) == MapperConfig()
    (tmp_path / 'list.yaml').write_text('ov3d_mapping:\n  ros__parameters: [1, 2]\n')
    with pytest.raises(ValueError, match='ros__parameters must be a mapping'):
        load_yaml_config([tmp_path / 'list.yaml'])


def test_validate_refuses_a_fraction_for_a_whole_number_field():
    """YAML and ROS parameters are typed; the Python API is not: 2.5 voxels of stride failed later, in numpy."""
    cfg = MapperConfig()
    cfg.map.pixel_stride, cfg.query.repetitions = 2.5, 2.0
    with pytest.raises(ValueError, match=r'map.pixel_stride must be a whole number \(int\), got 2.5; '
                                         r'query.repetitions must be a whole number \(int\), got 2.0'):
        validate(cfg)
    cfg.map.pixel_stride, cfg.query.repetitions = 2, 2
    cfg.map.max_depth_m = 4                                            # an int is a number
    validate(cfg)


@pytest.mark.parametrize('item, message', [
    ('purify.iterations=100000', r'purify.iterations must be a number in \[0, 200\]'),
    ('query.repetitions=1000', r'query.repetitions must be a number in \[1, 16\]'),
    ('features.image_short_side=100000', r'features.image_short_side must be a number in \[1, 2048\]'),
])
def test_settings_that_would_stall_the_mapper_for_minutes_are_refused(item, message):
    """A whole-map re-pool of 45 000 iterations took 104 s under the map lock; a text repeated 1 000 times or an
    image of 100 000 px would stall or exhaust memory in the same way."""
    with pytest.raises(ValueError, match=message):
        validate(_set(item))


def test_an_object_needs_at_least_one_voxel():
    """objects.min_voxels 0 passed the config check, then every object extraction refused it."""
    with pytest.raises(ValueError, match=r'objects.min_voxels must be a finite number >= 1, got 0'):
        validate(_set('objects.min_voxels=0'))
    validate(_set('objects.min_voxels=1'))
