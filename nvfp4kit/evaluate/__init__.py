"""nvfp4kit.evaluate"""
