from kvsparse.property_tests.settings import register_profiles

register_profiles()
