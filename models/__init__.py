"""recloop: models"""
