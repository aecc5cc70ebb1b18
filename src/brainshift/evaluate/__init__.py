"""brainshift.evaluate"""
