"""Geometry-guided purification of lifted features (GeoPurify): voxel neighbourhoods, affinities, pooling."""
