"""nvfp4kit.calibrate"""
