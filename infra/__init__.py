"""recloop: infra"""
