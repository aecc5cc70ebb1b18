"""brainshift.keypoints"""
