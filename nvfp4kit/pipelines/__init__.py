"""nvfp4kit.pipelines"""
