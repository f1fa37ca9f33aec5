"""nvfp4kit.model"""
