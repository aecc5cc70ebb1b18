"""brainshift.interpolate"""
