"""ROS 2 layer: nodes, parameters and message conversions (the only place that imports rclpy)."""
