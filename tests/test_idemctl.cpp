#include <gtest/gtest.h>
TEST(Idemctl, Placeholder) {}
