"""nvfp4kit.checkpoint"""
