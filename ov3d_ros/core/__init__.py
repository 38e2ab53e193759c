"""ROS-free core: camera model, depth lifting, voxel feature map, feature extractors and text queries."""
