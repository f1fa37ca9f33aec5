"""nvfp4kit.training"""
