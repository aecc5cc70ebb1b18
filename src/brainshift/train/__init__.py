"""brainshift.train"""
