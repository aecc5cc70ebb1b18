"""brainshift.model"""
