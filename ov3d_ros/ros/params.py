"""Declare the core config dataclasses as ROS parameters (``<section>.<field>``) and read them back."""
from __future__ import annotations

from dataclasses import fields

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ov3d_ros.core.config import MapperConfig, field_docs

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          list: ParameterType.PARAMETER_STRING_ARRAY}


def declare_config(node: Node, cfg: MapperConfig) -> None:
    """Declare one parameter per config field, with its docstring as the description."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        docs = field_docs(type(sub))
        for f in fields(sub):
            default = getattr(sub, f.name)
            desc = ParameterDescriptor(description=docs.get(f.name, ''), type=_TYPES[type(default)])
            # rclpy cannot tell the type of an empty list: declare it typed and unset (read back as [])
            value = Parameter.Type.STRING_ARRAY if default == [] else default
            node.declare_parameter(f'{section.name}.{f.name}', value, desc)


def read_config(node: Node) -> MapperConfig:
    """Build a MapperConfig from the node's current parameter values."""
    cfg = MapperConfig()
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            try:
                value = node.get_parameter(f'{section.name}.{f.name}').value
            except ParameterUninitializedException:     # a typed, unset list (empty default)
                value = []
            setattr(sub, f.name, list(value) if isinstance(value, (list, tuple)) else value)
    return cfg


def declare(node: Node, name: str, default, description: str):
    """Declare a node-level parameter with a description and return its value."""
    return node.declare_parameter(name, default, ParameterDescriptor(description=description)).value
