"""The retrieval task's analysis tools: the classical HOG + PCA + k-means retriever and Grad-CAM."""
