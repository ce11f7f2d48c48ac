"""recloop: serving"""
