"""Offline inputs and outputs: ScanNet-layout dataset folders and rosbag2 recordings."""


class DatasetError(ValueError):
    """A dataset (folder or bag) is missing files or holds unreadable ones."""
