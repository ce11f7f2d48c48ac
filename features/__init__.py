"""recloop: features"""
