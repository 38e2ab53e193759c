"""ROS 2 layer: nodes, parameters and message conversions (the only place that imports rclpy).

Node processes put torch's CPU allocations of 2 MB and more on transparent huge pages (PyTorch's
``THP_MEM_ALLOC_ENABLE``, which torch reads at its first allocation, so it is set here, before the nodes import
torch): the map snapshot the mapping node publishes after every keyframe is one fresh copy of the query layers,
and on 4 kB pages most of its time went to page faults (100 000 voxels at D = 512: 19 instead of 76 ms,
``benchmarks/bm_snapshot.py``). ``THP_MEM_ALLOC_ENABLE=0`` in the environment turns it off.
"""
import os as _os

_os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
