"""nvfp4kit.cli"""
