"""recloop: pipelines"""
