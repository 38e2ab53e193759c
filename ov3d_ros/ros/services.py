"""Services that always answer.

rclpy sends no response when a service callback raises: the caller waits until its own timeout, and the node only
logs the exception. Every ``success`` / ``message`` service of the node is created through :func:`create_service`,
so an error its callback did not foresee still answers ``success=false`` with the reason.
"""
from __future__ import annotations

from typing import Callable

from rclpy.node import Node


def create_service(node: Node, srv_type, name: str, callback: Callable, **kwargs):
    """``node.create_service`` whose ``callback(request, response)``, should it raise, answers ``success=false`` and
    ``message`` '<name> failed: <error>' (logged as an error) instead of no answer. ``srv_type``'s response must
    have ``success`` and ``message`` fields."""
    def answer(request, response):
        try:
            return callback(request, response)
        except Exception as e:          # noqa: BLE001 - the caller gets the reason, the node keeps its map
            response.success, response.message = False, f'{name} failed: {type(e).__name__}: {e}'
            node.get_logger().error(f'{response.message}; answered success=false, the node keeps running')
            return response
    return node.create_service(srv_type, name, answer, **kwargs)
